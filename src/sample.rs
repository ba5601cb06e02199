//! The sample batch the demo and the benchmark pay: the same ticket ids each
//! time, so the same fates at the simulated providers.

use crate::config::DEFAULT_AUTHORITIES;

/// A sample CSV: ticket ids, authorities in turn, and a reference each.
pub fn sample_csv(tickets: usize) -> String {
    let authorities: Vec<&str> = DEFAULT_AUTHORITIES.split(',').collect();
    let mut csv = String::from("ticket_id,authority,reference\n");
    for i in 1..=tickets {
        csv.push_str(&format!("T{i:06},{},REF-{i:08}\n", authorities[i % authorities.len()]));
    }
    csv
}
