//! Shared capacity: a provider's limits hold for the whole deployment, however
//! many instances run. Each provider's capacity is cut into slices
//! ([`super::limits::slices`]); an instance spends only the slices it holds a
//! lease on ([`crate::leases`]), renews them while it has work, stops using one
//! a safety margin before its lease could run out, and gives them back when
//! idle. Each instance announces how many slices it has work for, measured
//! from what it sent; the slices are shared max-min fairly: an instance that
//! needs less than an even split keeps what it needs, the ones that need more
//! split the rest, and one holding more than its share gives the rest back.
//! A provider that says "slow down" pauses it for every instance.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::time::Instant;

use super::ProviderName;
use super::limits::{Limiter, Slice, lock};
use crate::leases::{LeaseId, Leases};

/// A lease's term; renewed every [`RENEW_EVERY`].
pub const TERM: Duration = Duration::from_secs(20);
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How often each instance looks at its shares, and sooner, at most every
/// [`SOONEST`], when it holds less than its share and a caller finds none.
const TICK: Duration = Duration::from_secs(1);
const SOONEST: Duration = Duration::from_millis(200);
/// With more instances wanting a provider than it has slices, one holds a
/// slice this long while another waits, then hands it on and rests.
pub const ROTATE_AFTER: Duration = Duration::from_secs(10);
const REST: Duration = Duration::from_secs(3);
/// An instance sending at this part of what its slices allow needs more.
const HUNGRY: f64 = 0.9;
/// An instance that needs less keeps enough to send at most this part of it.
const ROOMY: f64 = 0.8;
/// What an instance needs is measured from what it sent over the last
/// [`REMEMBER`], read at most every [`MEASURE_OVER`].
const MEASURE_OVER: Duration = Duration::from_millis(500);
const REMEMBER: Duration = Duration::from_secs(2);
/// How often a pause set by another instance is looked for.
pub const PAUSE_POLL: Duration = Duration::from_millis(200);

/// One provider's shares as this instance holds them.
struct Shares {
    provider: ProviderName,
    slices: Vec<Slice>,
    limiter: Arc<Limiter>,
    held: Mutex<HashMap<u32, Held>>,
    /// No slice is taken before then: this instance just handed one on.
    resting_until: Mutex<Option<Instant>>,
    /// Holds less than its share: a caller finding no capacity is a reason to look again.
    short: AtomicBool,
    /// Holds more than an even split while others have work: one of them may
    /// be short of its share any moment, so it looks again soon.
    over: AtomicBool,
    need: Mutex<Need>,
    announced: AtomicU32,
}

impl Shares {
    fn new(provider: ProviderName, slices: Vec<Slice>, limiter: Arc<Limiter>) -> Shares {
        Shares {
            provider,
            slices,
            limiter,
            held: Mutex::new(HashMap::new()),
            resting_until: Mutex::new(None),
            short: AtomicBool::new(true),
            over: AtomicBool::new(false),
            need: Mutex::new(Need { readings: VecDeque::new() }),
            announced: AtomicU32::new(0),
        }
    }
}

/// What this instance sent a provider lately: readings at least
/// [`MEASURE_OVER`] apart, over the last [`REMEMBER`].
struct Need {
    readings: VecDeque<Reading>,
}

/// How many slices an instance has work for, and whether that was measured
/// or only assumed (nothing held, or too little sent yet to tell).
struct Demand {
    slices: u32,
    measured: bool,
}

struct Reading {
    at: Instant,
    sent: u64,
    peak_in_flight: u32,
    places: u32,
    queued: u32,
}

struct Held {
    lease: LeaseId,
    /// New calls only before this: the lease cannot have run out before the calls end.
    usable_until: Instant,
    taken_at: Instant,
    renewed_at: Instant,
    /// Being given back: no new calls, the lease kept until the last call is done.
    releasing: bool,
}

/// What an instance holds of one provider, as the status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ShareView {
    pub provider: ProviderName,
    pub slices: usize,
    pub held: usize,
    pub rate: f64,
    pub in_flight: u32,
    /// Calls this instance has in flight now, and callers waiting for capacity.
    pub calls_in_flight: u32,
    pub waiting: u32,
    /// Requests this instance has sent the provider since it started.
    pub sent: u64,
    /// Slices it last said it has work for.
    pub needs: u32,
    pub paused_for_ms: Option<u64>,
}

/// One provider's capacity: this instance's part and the whole deployment's.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderCapacity {
    #[serde(flatten)]
    pub here: ShareView,
    /// What the lease service says: `None` when it cannot be reached.
    pub deployment: Option<DeploymentShare>,
}

/// A provider's slices as the lease service holds them, for every instance.
#[derive(Debug, Clone, Serialize)]
pub struct DeploymentShare {
    pub held: usize,
    /// Slices held by each instance holding any.
    pub holders: BTreeMap<String, usize>,
    /// A pause one instance shared with all (a 429 or 503 with Retry-After).
    pub paused_until: Option<DateTime<Utc>>,
}

pub struct Capacity {
    leases: Arc<dyn Leases>,
    instance: String,
    /// Stop starting calls on a slice this long before its lease may end.
    margin: Duration,
    shares: Vec<Arc<Shares>>,
}

impl Capacity {
    /// Shares out `limiters` (each provider's, built with [`Limiter::empty`])
    /// with the other instances through `leases`, and keeps doing so on tasks
    /// of its own. Calls last at most `call_bound`, which sets the margin.
    pub fn start(
        leases: Arc<dyn Leases>,
        instance: String,
        call_bound: Duration,
        limiters: Vec<(ProviderName, Vec<Slice>, Arc<Limiter>)>,
    ) -> Arc<Capacity> {
        let margin = (call_bound + Duration::from_secs(1)).min(TERM - 2 * RENEW_EVERY);
        let shares = limiters
            .into_iter()
            .map(|(provider, slices, limiter)| Arc::new(Shares::new(provider, slices, limiter)))
            .collect();
        let capacity = Arc::new(Capacity { leases, instance, margin, shares });
        // A provider without limits has no slices to share.
        for shares in capacity.shares.iter().filter(|s| !s.slices.is_empty()) {
            tokio::spawn(capacity.clone().keep(shares.clone()));
            tokio::spawn(capacity.clone().follow_pauses(shares.clone()));
        }
        capacity
    }

    /// This provider is paused for everyone for `for_` (a 429 or 503 with Retry-After).
    pub fn pause(self: &Arc<Self>, provider: ProviderName, for_: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.leases.pause(provider.as_str(), for_).await {
                tracing::warn!(%provider, error = %e, "a provider's pause could not be shared");
            }
        });
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn view(&self) -> Vec<ShareView> {
        self.shares
            .iter()
            .map(|s| {
                let held = lock(&s.held);
                let (calls_in_flight, waiting) = s.limiter.in_use();
                let using: Vec<&Slice> = held.iter().filter(|(_, h)| !h.releasing).map(|(i, _)| &s.slices[*i as usize]).collect();
                ShareView {
                    provider: s.provider,
                    slices: s.slices.len(),
                    held: held.len(),
                    rate: if using.is_empty() { 0.0 } else { s.limiter.rate() },
                    in_flight: using.iter().map(|x| x.in_flight).sum(),
                    calls_in_flight,
                    waiting,
                    sent: s.limiter.sent(),
                    needs: s.announced.load(Relaxed),
                    paused_for_ms: s.limiter.paused_for().map(|d| d.as_millis() as u64),
                }
            })
            .collect()
    }

    /// [`Capacity::view`] beside what the lease service says of the whole deployment.
    pub async fn status(&self) -> Vec<ProviderCapacity> {
        let holders = self.leases.holders("").await;
        let mut out = Vec::new();
        for here in self.view() {
            let deployment = match (&holders, self.leases.paused_until(here.provider.as_str()).await) {
                (Ok(all), Ok(paused_until)) => {
                    let prefix = format!("{}/", here.provider);
                    let mut by = BTreeMap::new();
                    for (_, who) in all.iter().filter(|(r, _)| r.starts_with(&prefix)) {
                        *by.entry(who.clone()).or_insert(0) += 1;
                    }
                    let paused_until = paused_until.filter(|t| *t > Utc::now());
                    Some(DeploymentShare { held: by.values().sum(), holders: by, paused_until })
                }
                _ => None,
            };
            out.push(ProviderCapacity { here, deployment });
        }
        out
    }

    async fn follow_pauses(self: Arc<Self>, shares: Arc<Shares>) {
        loop {
            // An instance with nothing to send need not know.
            if !shares.limiter.busy() {
                tokio::time::sleep(PAUSE_POLL).await;
                continue;
            }
            if let Ok(Some(until)) = self.leases.paused_until(shares.provider.as_str()).await
                && let Ok(left) = (until - chrono::Utc::now()).to_std()
            {
                shares.limiter.pause(left);
            }
            tokio::time::sleep(PAUSE_POLL).await;
        }
    }

    async fn keep(self: Arc<Self>, shares: Arc<Shares>) {
        loop {
            let looked = Instant::now();
            self.look(&shares).await;
            let next_tick = tokio::time::sleep_until(looked + if shares.over.load(Relaxed) { SOONEST } else { TICK });
            tokio::pin!(next_tick);
            loop {
                tokio::select! {
                    () = &mut next_tick => break,
                    () = shares.limiter.wanted() => {
                        // At its share, callers waiting is just the provider's limit at work.
                        if shares.short.load(Relaxed) {
                            tokio::time::sleep_until(looked + SOONEST).await;
                            break;
                        }
                    }
                }
            }
        }
    }

    /// One look at a provider's shares: announce, renew, drop what can no
    /// longer be used, then take or give back slices towards the fair share.
    async fn look(self: &Arc<Self>, shares: &Arc<Shares>) {
        let group = shares.provider.as_str();
        let Demand { slices: need, measured } = self.need(shares);
        shares.announced.store(need, Relaxed);
        let wants = need > 0;
        let members = match self.leases.announce(group, &self.instance, need, TERM).await {
            Ok(members) => members,
            Err(e) => {
                tracing::warn!(provider = group, error = %e, "leases unreachable; spending only what is still safely held");
                self.drop_unusable(shares);
                return;
            }
        };
        self.renew(shares).await;
        self.drop_unusable(shares);
        let mut share = if wants { self.fair_share(shares, need, &members).await } else { Share::none() };
        let even = (shares.slices.len() / members.len().max(1)).max(1);
        if !measured {
            // Until it has sent enough to tell, no more than an even split of the
            // running instances: those finding work a moment later need not
            // wait for it to give back what it took first.
            share.target = share.target.min(even);
        }
        let holding = lock(&shares.held).values().filter(|h| !h.releasing).count();
        // Idle until now, a caller finding no capacity is the first sign of work.
        shares.short.store(holding < share.target || !wants, Relaxed);
        let others_want = members.iter().any(|m| m.wants > 0 && m.instance != self.instance);
        shares.over.store(others_want && holding > even, Relaxed);
        if share.someone_waits && self.hand_on(shares) {
            return;
        }
        let resting = lock(&shares.resting_until).is_some_and(|until| Instant::now() < until);
        if holding < share.target && !resting {
            // An even part of the running instances' at a time: one that found
            // work first need not give back what the others are about to ask for.
            self.take(shares, (share.target - holding).min(even), &share.taken).await;
        } else if holding > share.keep {
            self.give_back(shares, holding - share.keep);
        }
    }

    /// How many slices this instance has work for: none when idle; as many as
    /// it can get when, over the last few seconds, it sent at nearly all its
    /// slices allow or kept all its places busy (or it holds none while
    /// callers wait); otherwise enough to send what it sent with room to spare.
    fn need(&self, shares: &Shares) -> Demand {
        let n = shares.slices.len() as u32;
        let mut need = lock(&shares.need);
        if !shares.limiter.busy() {
            need.readings.clear();
            return Demand { slices: 0, measured: true };
        }
        let now = Instant::now();
        if need.readings.back().is_none_or(|r| now.duration_since(r.at) >= MEASURE_OVER) {
            let usage = shares.limiter.usage();
            let reading = Reading { at: now, sent: usage.sent, peak_in_flight: usage.peak_in_flight, places: usage.places, queued: usage.queued };
            need.readings.push_back(reading);
        }
        while need.readings.len() > 2 && now.duration_since(need.readings[1].at) >= REMEMBER {
            need.readings.pop_front();
        }
        let (first, last) = (&need.readings[0], &need.readings[need.readings.len() - 1]);
        let span = last.at.duration_since(first.at);
        if span < MEASURE_OVER {
            return Demand { slices: n, measured: false };
        }
        let sent_rate = (last.sent - first.sent) as f64 / span.as_secs_f64();
        let peak = need.readings.iter().skip(1).map(|r| r.peak_in_flight).max().unwrap_or(0);
        self.needed_slices(shares, sent_rate, peak, last)
    }

    fn needed_slices(&self, shares: &Shares, sent_rate: f64, peak_in_flight: u32, now: &Reading) -> Demand {
        let n = shares.slices.len() as u32;
        let held = lock(&shares.held).values().filter(|h| !h.releasing).count();
        if held == 0 {
            return Demand { slices: n, measured: false };
        }
        Demand { slices: self.measured_need(shares, held, sent_rate, peak_in_flight, now), measured: true }
    }

    fn measured_need(&self, shares: &Shares, held: usize, sent_rate: f64, peak_in_flight: u32, now: &Reading) -> u32 {
        let n = shares.slices.len() as u32;
        let (places, rate) = (now.places, shares.limiter.rate());
        let rate_bound = rate > 0.0 && sent_rate >= HUNGRY * rate;
        let flight_bound = places > 0 && peak_in_flight >= places;
        // Callers in line for capacity it lacks: what it sent is not what it has work for.
        let queued = now.queued > 0;
        if rate_bound || flight_bound || queued {
            return n;
        }
        // The peak in flight is already the most it needed; the rate is an average.
        let per_slice = |total: f64| total / held as f64;
        let by_rate = if rate > 0.0 { sent_rate / (ROOMY * per_slice(rate)) } else { 0.0 };
        let by_flight = if places > 0 { f64::from(peak_in_flight) / per_slice(f64::from(places)) } else { 0.0 };
        (by_rate.max(by_flight).ceil() as u32).clamp(1, n)
    }

    /// This instance's part of the slices, max-min fair over what every
    /// instance with work needs ([`allotment`]): at its floor while another
    /// holds less than its own, one more otherwise.
    async fn fair_share(&self, shares: &Shares, need: u32, members: &[crate::leases::Member]) -> Share {
        let n = shares.slices.len();
        let mut needs: Vec<(&str, usize)> = members
            .iter()
            .filter(|m| m.wants > 0 && m.instance != self.instance)
            .map(|m| (m.instance.as_str(), (m.wants as usize).min(n)))
            .collect();
        needs.push((self.instance.as_str(), (need as usize).min(n)));
        let parts = allotment(n, &needs);
        let mine = parts[&self.instance.as_str()];
        let prefix = format!("{}/", shares.provider);
        let Ok(holders) = self.leases.holders(&prefix).await else {
            return Share { target: mine.floor, keep: mine.floor, ..Share::none() };
        };
        let held_by = |who: &str| holders.iter().filter(|(_, h)| h == who).count();
        let others = || parts.iter().filter(|(w, _)| **w != self.instance);
        let someone_short = others().any(|(w, part)| held_by(w) < part.floor);
        let someone_waits = needs.len() > n && others().any(|(w, _)| held_by(w) == 0);
        let taken = holders.iter().filter_map(|(r, _)| r.strip_prefix(&prefix)?.parse().ok()).collect();
        // Slices beyond its part are given back only to someone short of theirs:
        // an instance alone with work keeps what a lull would otherwise take.
        let (target, keep) = if someone_short { (mine.floor, mine.floor) } else { (mine.ceil, n) };
        Share { target, keep, someone_waits, taken }
    }

    /// More instances want the provider than it has slices: one that has held
    /// a slice for [`ROTATE_AFTER`] hands it on and rests, so every instance
    /// gets its turn. Returns whether it did.
    fn hand_on(self: &Arc<Self>, shares: &Arc<Shares>) -> bool {
        let longest = lock(&shares.held).values().filter(|h| !h.releasing).map(|h| h.taken_at.elapsed()).max();
        if longest.is_none_or(|held_for| held_for < ROTATE_AFTER) {
            return false;
        }
        *lock(&shares.resting_until) = Some(Instant::now() + REST);
        self.give_back(shares, 1);
        true
    }

    async fn renew(&self, shares: &Shares) {
        let due: Vec<(u32, LeaseId)> = lock(&shares.held)
            .iter()
            .filter(|(_, h)| h.renewed_at.elapsed() >= RENEW_EVERY)
            .map(|(i, h)| (*i, h.lease.clone()))
            .collect();
        for (index, lease) in due {
            let asked = Instant::now();
            match self.leases.renew(&resource(shares.provider, index), &lease, TERM).await {
                Ok(true) => {
                    if let Some(h) = lock(&shares.held).get_mut(&index) {
                        h.renewed_at = asked;
                        h.usable_until = asked + TERM - self.margin;
                    }
                }
                Ok(false) => {
                    tracing::warn!(provider = %shares.provider, index, "a capacity lease was lost");
                    if let Some(h) = lock(&shares.held).get_mut(&index) {
                        h.usable_until = asked;
                    }
                }
                Err(e) => tracing::warn!(provider = %shares.provider, index, error = %e, "a capacity lease could not be renewed"),
            }
        }
    }

    /// Slices whose lease may run out before a call started now would end stop being spent.
    fn drop_unusable(&self, shares: &Arc<Shares>) {
        let now = Instant::now();
        let mut held = lock(&shares.held);
        let lapsed: Vec<u32> = held.iter().filter(|(_, h)| h.usable_until <= now).map(|(i, _)| *i).collect();
        for index in lapsed {
            let h = held.remove(&index).expect("listed");
            if !h.releasing {
                let slice = shares.slices[index as usize];
                let limiter = shares.limiter.clone();
                tokio::spawn(async move { limiter.withdraw_in_flight(slice.in_flight).await });
            }
        }
        shares.limiter.set_rate(rate_of(shares, &held));
    }

    /// Takes up to `wanted` free slices, asking for them all at once: an
    /// instance that finds work waits one lease round trip for its share, not
    /// one per slice (which held the first second of a batch to a trickle).
    async fn take(&self, shares: &Arc<Shares>, mut wanted: usize, taken: &HashSet<u32>) {
        let n = shares.slices.len() as u32;
        let start = offset(&self.instance, n);
        let mut free = (0..n).map(|k| (start + k) % n).filter(|index| !taken.contains(index) && !lock(&shares.held).contains_key(index));
        while wanted > 0 {
            let asking: Vec<u32> = free.by_ref().take(wanted).collect();
            if asking.is_empty() {
                return;
            }
            let asked = Instant::now();
            let names: Vec<String> = asking.iter().map(|&index| resource(shares.provider, index)).collect();
            let answers = futures::future::join_all(names.iter().map(|name| self.leases.acquire(name, &self.instance, TERM))).await;
            let mut unreachable = None;
            for (index, answer) in asking.into_iter().zip(answers) {
                match answer {
                    Ok(Some(lease)) => {
                        let h = Held { lease, usable_until: asked + TERM - self.margin, taken_at: asked, renewed_at: asked, releasing: false };
                        let mut held = lock(&shares.held);
                        held.insert(index, h);
                        shares.limiter.set_capacity(rate_of(shares, &held), shares.slices[index as usize].in_flight);
                        wanted -= 1;
                    }
                    Ok(None) => {}
                    Err(e) => unreachable = Some(e),
                }
            }
            if let Some(e) = unreachable {
                tracing::warn!(provider = %shares.provider, error = %e, "capacity leases unreachable");
                return;
            }
        }
    }

    /// Stops spending `count` slices, the longest held first, and gives each
    /// lease back once its calls are done.
    fn give_back(self: &Arc<Self>, shares: &Arc<Shares>, count: usize) {
        let mut held = lock(&shares.held);
        let mut spent: Vec<(Instant, u32)> = held.iter().filter(|(_, h)| !h.releasing).map(|(i, h)| (h.taken_at, *i)).collect();
        spent.sort();
        let chosen: Vec<u32> = spent.into_iter().take(count).map(|(_, i)| i).collect();
        for index in &chosen {
            held.get_mut(index).expect("listed").releasing = true;
        }
        shares.limiter.set_rate(rate_of(shares, &held));
        drop(held);
        // Requests of the last window were counted against the larger share:
        // the next holder may start spending it once that window has passed.
        let quiet_from = Instant::now() + shares.limiter.window();
        for index in chosen {
            let (this, shares) = (self.clone(), shares.clone());
            tokio::spawn(async move {
                let slice = shares.slices[index as usize];
                shares.limiter.withdraw_in_flight(slice.in_flight).await;
                tokio::time::sleep_until(quiet_from).await;
                let lease = lock(&shares.held).remove(&index).map(|h| h.lease);
                if let Some(lease) = lease {
                    let _ = this.leases.release(&resource(shares.provider, index), &lease).await;
                }
            });
        }
    }

    /// Gives every lease back (an instance that stops), so others need not wait for them to run out.
    pub async fn release_all(&self) {
        for shares in &self.shares {
            let held: Vec<(u32, LeaseId)> = lock(&shares.held).drain().map(|(i, h)| (i, h.lease)).collect();
            shares.limiter.set_rate(0.0);
            for (index, lease) in held {
                let _ = self.leases.release(&resource(shares.provider, index), &lease).await;
            }
            let _ = self.leases.leave(shares.provider.as_str(), &self.instance).await;
        }
    }
}

struct Share {
    /// How many slices this instance may take.
    target: usize,
    /// How many it may keep: more than its target while no one else is short.
    keep: usize,
    /// Another instance with work holds none, and there are fewer slices than instances with work.
    someone_waits: bool,
    /// The slices someone holds, as the lease service listed them.
    taken: HashSet<u32>,
}

impl Share {
    fn none() -> Share {
        Share { target: 0, keep: 0, someone_waits: false, taken: HashSet::new() }
    }
}

/// An instance's part of a provider's slices.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Part {
    /// Held by right.
    floor: usize,
    /// Held while no one else is below their floor.
    ceil: usize,
}

/// Max-min fair parts of `n` slices for instances each needing some: each
/// gets what it needs if that is no more than an even split of what the
/// instances needing less left over; those needing more split the rest, with
/// the remainder of the split as one more for any of them. With more
/// instances than slices each is owed one, and they take turns.
fn allotment<'a>(n: usize, needs: &[(&'a str, usize)]) -> HashMap<&'a str, Part> {
    let mut by_need = needs.to_vec();
    by_need.sort_by_key(|(who, need)| (*need, *who));
    let mut parts = HashMap::new();
    let mut left = n;
    for (i, (who, need)) in by_need.iter().enumerate() {
        let sharing = by_need.len() - i;
        if need * sharing <= left {
            parts.insert(*who, Part { floor: *need, ceil: *need });
            left -= need;
            continue;
        }
        let even = left / sharing;
        let ceil = even + usize::from(!left.is_multiple_of(sharing));
        for (who, _) in &by_need[i..] {
            parts.insert(*who, Part { floor: even.max(1), ceil: ceil.max(1) });
        }
        break;
    }
    parts
}

fn rate_of(shares: &Shares, held: &HashMap<u32, Held>) -> f64 {
    held.iter().filter(|(_, h)| !h.releasing).map(|(i, _)| shares.slices[*i as usize].rate).sum()
}

fn resource(provider: ProviderName, index: u32) -> String {
    format!("{provider}/{index}")
}

/// Where an instance starts looking for free slices, so instances do not all race for slice 0.
fn offset(instance: &str, n: u32) -> u32 {
    let hash = instance.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    hash % n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(n: usize, needs: &[(&'static str, usize)]) -> Vec<(usize, usize)> {
        let all = allotment(n, needs);
        needs.iter().map(|(who, _)| (all[who].floor, all[who].ceil)).collect()
    }

    #[test]
    fn instances_needing_all_split_evenly() {
        assert_eq!(parts(20, &[("a", 20), ("b", 20), ("c", 20), ("d", 20)]), vec![(5, 5); 4]);
        assert_eq!(parts(20, &[("a", 20), ("b", 20), ("c", 20)]), vec![(6, 7); 3]);
    }

    #[test]
    fn what_one_needs_less_of_goes_to_the_others() {
        assert_eq!(parts(20, &[("a", 20), ("b", 2), ("c", 20), ("d", 20)]), vec![(6, 6), (2, 2), (6, 6), (6, 6)]);
        assert_eq!(parts(20, &[("a", 3), ("b", 4), ("c", 20)]), vec![(3, 3), (4, 4), (13, 13)]);
    }

    #[test]
    fn needs_that_fit_are_met_and_the_rest_stays_free() {
        assert_eq!(parts(20, &[("a", 3), ("b", 4)]), vec![(3, 3), (4, 4)]);
    }

    #[test]
    fn never_more_than_the_slices() {
        for needs in [vec![("a", 7), ("b", 9), ("c", 20)], vec![("a", 1), ("b", 20), ("c", 20)], vec![("a", 19), ("b", 19)]] {
            let total: usize = parts(20, &needs).iter().map(|(floor, _)| floor).sum();
            assert!(total <= 20, "{needs:?}: {total}");
        }
    }

    #[test]
    fn more_instances_than_slices_each_owed_one() {
        assert_eq!(parts(2, &[("a", 2), ("b", 2), ("c", 2)]), vec![(1, 1); 3]);
    }
}
