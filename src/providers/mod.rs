//! The external providers: who they are, what is said to them on the wire,
//! how we call them without flooding them, and a simulator that plays them all.

pub mod capacity;
pub mod client;
pub mod limits;
pub mod redact;
pub mod simulator;
pub mod wire;

pub use crate::domain::ProviderName;
use simulator::SHIPPED;

/// The TOML text of a shipped scenario by name, or of a file by path.
pub fn scenario_text(name_or_path: &str) -> Result<String, String> {
    if let Some((_, text)) = SHIPPED.iter().find(|(n, _)| *n == name_or_path) {
        return Ok((*text).to_owned());
    }
    std::fs::read_to_string(name_or_path).map_err(|e| {
        let names: Vec<_> = SHIPPED.iter().map(|(n, _)| *n).collect();
        format!("`{name_or_path}` is neither a shipped scenario ({}) nor a readable file: {e}", names.join(", "))
    })
}

