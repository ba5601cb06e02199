//! Provider protection: each provider's rate and concurrency limits, cut into
//! slices that instances lease (see [`super::capacity`]), never exceeded by
//! the deployment, and a pause when a provider says "slow down".

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::ProviderName;
use super::simulator::Scenario;

/// What the handler knows of a provider's contract (read from the same TOML
/// file as a simulator scenario: `[client]`, `[defaults]`, `[providers.NAME]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderLimits {
    /// Requests per second allowed (0 = unlimited).
    pub rate_limit: f64,
    /// Requests in flight allowed (0 = unlimited).
    pub concurrency_limit: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    pub timeout: Duration,
    /// Fraction of a provider's rate limit we allow ourselves: a limit of N
    /// requests a second is spent as N requests in every `1 / rate_headroom`
    /// seconds, so the network's timing jitter never puts more than N into
    /// one of the provider's seconds.
    pub rate_headroom: f64,
    pub providers: HashMap<ProviderName, ProviderLimits>,
}

impl ClientConfig {
    /// What the handler keeps to, from the same scenario the providers are described by.
    pub fn from_scenario(scenario: &Scenario) -> ClientConfig {
        let providers = scenario
            .providers
            .iter()
            .map(|(name, p)| (*name, ProviderLimits { rate_limit: f64::from(p.rate_limit), concurrency_limit: p.concurrency_limit }))
            .collect();
        ClientConfig {
            timeout: Duration::from_millis(scenario.client.timeout_ms),
            rate_headroom: scenario.client.rate_headroom,
            providers,
        }
    }
}

/// How late past its slot a caller may still go.
const LATE_TOLERANCE: Duration = Duration::from_millis(20);

/// Slices a provider's capacity is cut into at most.
pub const MAX_SLICES: u32 = 20;

/// One share of a provider's capacity: what its holder may spend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slice {
    pub index: u32,
    /// Whole requests of the provider's per-second limit; 0 when it has no rate limit.
    pub rate: f64,
    /// Calls in flight; 0 when the provider has no concurrency limit.
    pub in_flight: u32,
}

/// A provider's capacity cut into slices: at most [`MAX_SLICES`], no more
/// than its concurrency limit (every slice may have a call in flight) nor its
/// rate limit (every slice has whole requests a second, so the holders'
/// shares add up to the limit exactly). A provider with no limits has no
/// slices (nothing to share).
pub fn slices(limits: &ProviderLimits) -> Vec<Slice> {
    let rate = whole_requests(limits.rate_limit);
    let conc = limits.concurrency_limit;
    if rate == 0 && conc == 0 {
        return Vec::new();
    }
    let at_most = |limit: u32| if limit > 0 { limit } else { u32::MAX };
    let n = MAX_SLICES.min(at_most(conc)).min(at_most(rate));
    let part = |total: u32, index: u32| if total > 0 { total / n + u32::from(index < total % n) } else { 0 };
    (0..n).map(|index| Slice { index, rate: f64::from(part(rate, index)), in_flight: part(conc, index) }).collect()
}

/// The span a limiter's whole requests are counted in: a second stretched by
/// the headroom, and for a limit under one request a second, the time one takes.
fn window(rate_limit: f64, headroom: f64) -> Duration {
    let second = if rate_limit > 0.0 && rate_limit < 1.0 { 1.0 / rate_limit } else { 1.0 };
    Duration::from_secs_f64(second / headroom.clamp(0.01, 1.0))
}

/// A rate limit in whole requests a second, or one for a limit under one a
/// second (spent over its own longer window).
fn whole_requests(rate_limit: f64) -> u32 {
    if rate_limit >= 1.0 { rate_limit.floor().min(f64::from(u32::MAX)) as u32 } else { u32::from(rate_limit > 0.0) }
}

/// How long without a call before a limiter counts as idle (its shares go back).
pub const IDLE_AFTER: Duration = Duration::from_secs(2);

/// Spaces one provider's requests evenly at the allowed rate and caps how many
/// are in flight. Waiting callers queue in order; nobody spins. The capacity
/// is either the whole limit (one process is the deployment) or the sum of the
/// slices this instance holds a lease on, changed as leases come and go.
pub struct Limiter {
    /// Whether the provider has a rate limit, a concurrency limit.
    limited: (bool, bool),
    pace: Mutex<Pace>,
    in_flight: Option<Arc<Gate>>,
    /// Woken when capacity arrives.
    opened: Notify,
    /// Woken when a caller finds no capacity: whoever shares it out should look now.
    wanted: Notify,
    waiting: AtomicU32,
    last_used: Mutex<Instant>,
    /// Requests let through, ever.
    sent: AtomicU64,
}

/// What a limiter let through: whoever shares its capacity out reads it to
/// learn how much this instance needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// Requests let through, ever.
    pub sent: u64,
    /// The most requests on their way at once since the last reading (not
    /// counting callers holding a place while they wait for a slot in time).
    pub peak_in_flight: u32,
    /// Places in flight this limiter has now (0 without a concurrency limit).
    pub places: u32,
    /// Callers queued now for capacity this limiter does not have: waiting for
    /// a place in flight, or without a concurrency limit, for a later slot
    /// than the next.
    pub queued: u32,
}

struct Pace {
    next_slot: Instant,
    /// Slots taken by callers that stopped waiting before them: the next
    /// callers take these first, so callers giving up together do not push
    /// everyone after them seconds out.
    spare: BTreeSet<Instant>,
    /// Between two requests; `None` with no rate limit.
    interval: Option<Duration>,
    /// Whether there is any capacity to spend.
    open: bool,
    /// At most `allowed` requests in any `window`: the guarantee the spacing
    /// alone cannot give when callers wake late or the allowance changes.
    window: Duration,
    allowed: u32,
    sent: VecDeque<Instant>,
}

enum Window {
    Counted,
    /// No rate to spend: the slices went back.
    Closed,
    FullUntil(Instant),
}

/// A slot in time a caller waits for; given back if the caller stops waiting before it.
struct Claim<'a> {
    limiter: &'a Limiter,
    slot: Option<Instant>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            lock(&self.limiter.pace).spare.insert(slot);
        }
    }
}

/// Counts a caller as waiting while it waits.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Limiter {
    /// The whole of the provider's limits, for a process that is the deployment.
    pub fn whole(limits: &ProviderLimits, headroom: f64) -> Limiter {
        let limiter = Limiter::empty(limits, headroom);
        limiter.set_capacity(f64::from(whole_requests(limits.rate_limit)), limits.concurrency_limit);
        limiter
    }

    /// No capacity until [`Limiter::set_capacity`] gives some (the slices held).
    pub fn empty(limits: &ProviderLimits, headroom: f64) -> Limiter {
        let limited = (limits.rate_limit > 0.0, limits.concurrency_limit > 0);
        let pace = Pace {
            next_slot: Instant::now(),
            spare: BTreeSet::new(),
            interval: None,
            open: !limited.0 && !limited.1,
            window: window(limits.rate_limit, headroom),
            allowed: 0,
            sent: VecDeque::new(),
        };
        Limiter {
            limited,
            pace: Mutex::new(pace),
            in_flight: limited.1.then(|| Arc::new(Gate::default())),
            opened: Notify::new(),
            wanted: Notify::new(),
            waiting: AtomicU32::new(0),
            last_used: Mutex::new(Instant::now() - IDLE_AFTER),
            sent: AtomicU64::new(0),
        }
    }

    /// Sets the rate this limiter spends (whole requests of the provider's
    /// per-second limit) and adds `add_in_flight` places in flight.
    pub fn set_capacity(&self, rate: f64, add_in_flight: u32) {
        if let Some(g) = &self.in_flight {
            g.widen(add_in_flight);
        }
        self.set_rate(rate);
    }

    /// Sets the rate; a rate-limited provider at rate 0 is closed to new calls.
    pub fn set_rate(&self, rate: f64) {
        let mut pace = lock(&self.pace);
        let allowed = rate.max(0.0).floor() as u32;
        if allowed != pace.allowed {
            // Spaced for another rate.
            pace.spare.clear();
        }
        pace.allowed = allowed;
        // Rounded up: the allowed requests spaced by it never fall inside one window.
        pace.interval = (pace.allowed > 0).then(|| Duration::from_nanos(pace.window.as_nanos().div_ceil(u128::from(pace.allowed)) as u64));
        pace.open = if self.limited.0 { pace.allowed > 0 } else { true };
        drop(pace);
        self.opened.notify_waiters();
    }

    /// Takes back `n` places in flight at once (no new call takes them), and
    /// returns when the calls beyond what is left are done.
    pub async fn withdraw_in_flight(&self, n: u32) {
        if let (Some(g), true) = (&self.in_flight, n > 0) {
            g.narrow(n).await;
        }
    }

    /// Whether someone has wanted to call the provider lately.
    pub fn busy(&self) -> bool {
        self.waiting.load(Relaxed) > 0 || lock(&self.last_used).elapsed() < IDLE_AFTER
    }

    /// Calls in flight now, and callers waiting for capacity.
    pub fn in_use(&self) -> (u32, u32) {
        let calls = self.in_flight.as_ref().map_or(0, |g| g.taken());
        (calls, self.waiting.load(Relaxed))
    }

    /// Requests let through, ever.
    pub fn sent(&self) -> u64 {
        self.sent.load(Relaxed)
    }

    /// What was let through; the peak in flight starts again from the calls in flight now.
    pub fn usage(&self) -> Usage {
        let (peak_in_flight, places, queued) = match &self.in_flight {
            Some(g) => {
                let sending = g.sending.load(Relaxed);
                let (places, queued) = g.allowed_and_queued();
                (g.peak.swap(sending, Relaxed).max(sending), places, queued)
            }
            None => (0, 0, self.waiting.load(Relaxed).saturating_sub(1)),
        };
        Usage { sent: self.sent.load(Relaxed), peak_in_flight, places, queued }
    }

    /// Resolves when a caller found no capacity.
    pub async fn wanted(&self) {
        self.wanted.notified().await;
    }

    /// Waits for a place in flight and then for the next free slot in time.
    /// The permit is held until the provider is done with the request, which
    /// may be after its caller stopped waiting for the answer.
    pub async fn acquire(&self) -> Option<InFlight> {
        self.waiting.fetch_add(1, Relaxed);
        let _waiting = Waiting(&self.waiting);
        loop {
            self.until_open().await;
            let mut permit = match &self.in_flight {
                Some(g) => Some(g.enter(&self.wanted).await),
                None => None,
            };
            if self.until_slot().await {
                *lock(&self.last_used) = Instant::now();
                self.sent.fetch_add(1, Relaxed);
                if let Some(p) = &mut permit {
                    p.send();
                }
                return permit;
            }
            // Closed while waiting for a slot (the slices went back): the place
            // in flight goes back too, so the slices can be handed on.
            drop(permit);
        }
    }

    async fn until_open(&self) {
        loop {
            let opened = self.opened.notified();
            if lock(&self.pace).open {
                return;
            }
            self.wanted.notify_one();
            opened.await;
        }
    }

    /// Waits for the next slot and for room in the window; `false` when the
    /// limiter closed meanwhile.
    async fn until_slot(&self) -> bool {
        // A caller that wakes well after its slot (the machine was busy) takes a
        // new one: late callers going all at once would be a burst past the limit.
        while let Some((slot, interval)) = self.take_slot() {
            let mut claim = Claim { limiter: self, slot: Some(slot) };
            tokio::time::sleep_until(slot).await;
            claim.slot = None;
            if Instant::now().duration_since(slot) <= interval.max(LATE_TOLERANCE) {
                break;
            }
        }
        // A window still full (a request before went late) holds this one back
        // without costing it its slot: a second slot would be a request lost.
        loop {
            match self.count_in_window() {
                Window::Counted => return true,
                Window::Closed => return false,
                Window::FullUntil(until) => tokio::time::sleep_until(until).await,
            }
        }
    }

    /// Counts a request about to be sent, or says when the window has room for it.
    fn count_in_window(&self) -> Window {
        if !self.limited.0 {
            return Window::Counted;
        }
        let mut pace = lock(&self.pace);
        if pace.allowed == 0 {
            return Window::Closed;
        }
        let now = Instant::now();
        let window = pace.window;
        while pace.sent.front().is_some_and(|t| *t + window <= now) {
            pace.sent.pop_front();
        }
        let allowed = pace.allowed as usize;
        if pace.sent.len() < allowed {
            pace.sent.push_back(now);
            return Window::Counted;
        }
        Window::FullUntil(pace.sent[pace.sent.len() - allowed] + window)
    }

    /// Requests a second this limiter spends now (0 without a rate limit).
    pub fn rate(&self) -> f64 {
        let pace = lock(&self.pace);
        f64::from(pace.allowed) / pace.window.as_secs_f64()
    }

    /// The span in which at most the allowed requests are sent.
    pub fn window(&self) -> Duration {
        lock(&self.pace).window
    }

    fn take_slot(&self) -> Option<(Instant, Duration)> {
        let mut pace = lock(&self.pace);
        let interval = pace.interval?;
        let now = Instant::now();
        // A spare slot already past is time that went unused: spending it now would be a burst.
        pace.spare = pace.spare.split_off(&now);
        if let Some(slot) = pace.spare.pop_first() {
            return Some((slot, interval));
        }
        let slot = pace.next_slot.max(now);
        pace.next_slot = slot + interval;
        Some((slot, interval))
    }

    /// The provider asked us to wait (429 Retry-After): nobody here calls it before then.
    pub fn pause(&self, for_: Duration) {
        let mut pace = lock(&self.pace);
        pace.next_slot = pace.next_slot.max(Instant::now() + for_);
        let resume = pace.next_slot;
        pace.spare = pace.spare.split_off(&resume);
    }

    /// Until when calls wait for a pause, if they do.
    pub fn paused_for(&self) -> Option<Duration> {
        lock(&self.pace).next_slot.checked_duration_since(Instant::now()).filter(|d| *d > Duration::from_millis(50))
    }
}

/// Places in flight: how many are allowed and how many are taken, and the
/// callers waiting for one, served in the order they came. Unlike a
/// semaphore, places can be taken back at once, ahead of waiting callers.
#[derive(Default)]
struct Gate {
    places: Mutex<Places>,
    /// Woken when a place is given back (a narrowing waits on it).
    changed: Notify,
    /// Places whose request is on its way (the others wait for a slot in time).
    sending: AtomicU32,
    /// The most requests on their way at once since [`Limiter::usage`] last read it.
    peak: AtomicU32,
}

#[derive(Default)]
struct Places {
    allowed: u32,
    taken: u32,
    queue: VecDeque<oneshot::Sender<()>>,
}

impl Places {
    fn within(&self) -> bool {
        self.taken <= self.allowed
    }

    /// Hands free places to the callers first in line.
    fn hand_on(&mut self) {
        while self.taken < self.allowed {
            let Some(next) = self.queue.pop_front() else { return };
            // A caller that stopped waiting has dropped its end.
            if next.send(()).is_ok() {
                self.taken += 1;
            }
        }
    }
}

/// A place in flight, given back when dropped.
pub struct InFlight {
    gate: Arc<Gate>,
    /// Past its slot in time: the request is on its way.
    sent: bool,
}

impl InFlight {
    fn send(&mut self) {
        self.sent = true;
        let sending = self.gate.sending.fetch_add(1, Relaxed) + 1;
        self.gate.peak.fetch_max(sending, Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.sent {
            self.gate.sending.fetch_sub(1, Relaxed);
        }
        self.gate.give_back();
    }
}

/// A caller's place in line; if it stops waiting just as a place was handed
/// to it, the place goes on to the next in line.
struct InLine {
    gate: Arc<Gate>,
    turn: Option<oneshot::Receiver<()>>,
}

impl Drop for InLine {
    fn drop(&mut self) {
        if let Some(mut turn) = self.turn.take() {
            turn.close();
            if turn.try_recv().is_ok() {
                self.gate.give_back();
            }
        }
    }
}

impl Gate {
    async fn enter(self: &Arc<Self>, wanted: &Notify) -> InFlight {
        loop {
            let turn = {
                let mut places = lock(&self.places);
                if places.queue.is_empty() && places.taken < places.allowed {
                    places.taken += 1;
                    return InFlight { gate: self.clone(), sent: false };
                }
                // Callers that stopped waiting leave their turn behind; the line keeps only the others.
                places.queue.retain(|turn| !turn.is_closed());
                let (tx, rx) = oneshot::channel();
                places.queue.push_back(tx);
                rx
            };
            wanted.notify_one();
            let mut line = InLine { gate: self.clone(), turn: Some(turn) };
            let handed = match line.turn.as_mut() {
                Some(turn) => turn.await.is_ok(),
                None => false,
            };
            if handed {
                line.turn = None;
                return InFlight { gate: self.clone(), sent: false };
            }
        }
    }

    fn give_back(&self) {
        {
            let mut places = lock(&self.places);
            places.taken -= 1;
            places.hand_on();
        }
        self.changed.notify_waiters();
    }

    /// Calls in flight now (places taken).
    fn taken(&self) -> u32 {
        lock(&self.places).taken
    }

    /// Places allowed, and callers in line for one (not counting those that stopped waiting).
    fn allowed_and_queued(&self) -> (u32, u32) {
        let places = lock(&self.places);
        (places.allowed, places.queue.iter().filter(|turn| !turn.is_closed()).count() as u32)
    }

    fn widen(&self, n: u32) {
        let mut places = lock(&self.places);
        places.allowed += n;
        places.hand_on();
    }

    async fn narrow(&self, n: u32) {
        {
            let mut places = lock(&self.places);
            places.allowed = places.allowed.saturating_sub(n);
        }
        loop {
            let changed = self.changed.notified();
            if lock(&self.places).within() {
                return;
            }
            changed.await;
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_come_from_the_scenarios_defaults_and_overrides() {
        let scenario = Scenario::from_toml(
            "[client]\ntimeout_ms = 1500\n[defaults]\nrate_limit = 100\nconcurrency_limit = 32\nlatency_ms = [1, 2]\n[providers.gateway]\nrate_limit = 20\n",
        )
        .unwrap();
        let cfg = ClientConfig::from_scenario(&scenario);
        assert_eq!(cfg.timeout, Duration::from_millis(1500));
        assert_eq!(cfg.providers[&ProviderName::Gateway], ProviderLimits { rate_limit: 20.0, concurrency_limit: 32 });
        assert_eq!(cfg.providers[&ProviderName::Fraud].rate_limit, 100.0);
        assert_eq!(cfg.providers.len(), ProviderName::ALL.len());
    }

    #[tokio::test(start_paused = true)]
    async fn requests_are_spaced_at_the_allowed_rate() {
        let limiter = Limiter::whole(&ProviderLimits { rate_limit: 10.0, concurrency_limit: 0 }, 1.0);
        let start = Instant::now();
        for _ in 0..11 {
            let _ = limiter.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::from_secs(1), "11 requests at 10/s take one second");
        limiter.pause(Duration::from_secs(5));
        let before = Instant::now();
        let _ = limiter.acquire().await;
        assert!(before.elapsed() >= Duration::from_secs(5));
    }

    #[tokio::test]
    async fn no_more_than_the_concurrency_limit_are_in_flight() {
        let limiter = Limiter::whole(&ProviderLimits { rate_limit: 0.0, concurrency_limit: 2 }, 1.0);
        let a = limiter.acquire().await;
        let b = limiter.acquire().await;
        assert!(tokio::time::timeout(Duration::from_millis(50), limiter.acquire()).await.is_err());
        drop(a);
        assert!(tokio::time::timeout(Duration::from_millis(50), limiter.acquire()).await.is_ok());
        drop(b);
    }

    /// A place in flight goes to the caller that has waited longest, so no
    /// caller waits past its turn however many come after it.
    #[tokio::test]
    async fn places_in_flight_go_in_the_order_callers_came() {
        let limiter = Arc::new(Limiter::whole(&ProviderLimits { rate_limit: 0.0, concurrency_limit: 1 }, 1.0));
        let first = limiter.acquire().await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut callers = Vec::new();
        for i in 0..20 {
            let (caller, order) = (limiter.clone(), order.clone());
            callers.push(tokio::spawn(async move {
                let place = caller.acquire().await;
                lock(&order).push(i);
                tokio::task::yield_now().await;
                drop(place);
            }));
            while limiter.in_use().1 < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        // One caller gives up: its turn passes to the next in line.
        let quitter = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire().await }
        });
        while limiter.in_use().1 < 21 {
            tokio::task::yield_now().await;
        }
        quitter.abort();
        drop(first);
        use futures::FutureExt;
        assert!(limiter.acquire().now_or_never().is_none(), "a newcomer does not take the place of those in line");
        futures::future::join_all(callers).await;
        assert_eq!(*lock(&order), (0..20).collect::<Vec<_>>());
        assert_eq!(limiter.in_use(), (0, 0), "every place came back");
        assert!(tokio::time::timeout(Duration::from_millis(50), limiter.acquire()).await.is_ok());
    }

    #[test]
    fn capacity_is_cut_into_slices_that_add_up_to_the_limit() {
        let all = slices(&ProviderLimits { rate_limit: 100.0, concurrency_limit: 32 });
        assert_eq!(all.len(), 20);
        assert!(all.iter().all(|s| s.rate == 5.0), "whole requests a second each: {all:?}");
        assert_eq!(all.iter().map(|s| s.in_flight).sum::<u32>(), 32);
        assert!(all.iter().all(|s| (1..=2).contains(&s.in_flight)));
        let tight = slices(&ProviderLimits { rate_limit: 20.0, concurrency_limit: 4 });
        assert_eq!(tight.iter().map(|s| (s.rate, s.in_flight)).collect::<Vec<_>>(), vec![(5.0, 1); 4]);
        let rate_only = slices(&ProviderLimits { rate_limit: 40.0, concurrency_limit: 0 });
        assert_eq!((rate_only.len(), rate_only[0].rate, rate_only[0].in_flight), (20, 2.0, 0));
        let slow = slices(&ProviderLimits { rate_limit: 7.5, concurrency_limit: 32 });
        assert_eq!(slow.iter().map(|s| s.rate).collect::<Vec<_>>(), vec![1.0; 7], "no slice of less than one request a second");
        let odd = slices(&ProviderLimits { rate_limit: 30.0, concurrency_limit: 0 });
        assert_eq!(odd.iter().map(|s| s.rate).sum::<f64>(), 30.0);
        assert!(slices(&ProviderLimits { rate_limit: 0.0, concurrency_limit: 0 }).is_empty());
        let trickle = ProviderLimits { rate_limit: 0.5, concurrency_limit: 4 };
        assert_eq!(slices(&trickle).iter().map(|s| s.rate).collect::<Vec<_>>(), vec![1.0]);
        let limiter = Limiter::whole(&trickle, 1.0);
        assert_eq!((limiter.window(), limiter.rate()), (Duration::from_secs(2), 0.5), "one request every two seconds");
    }

    /// Callers always waiting get the whole allowance: a request held back by a
    /// full window keeps its slot instead of taking another.
    #[tokio::test(start_paused = true)]
    async fn callers_always_waiting_get_the_whole_rate() {
        for rate in [25.0, 100.0] {
            let limiter = Arc::new(Limiter::whole(&ProviderLimits { rate_limit: rate, concurrency_limit: 64 }, 0.95));
            let start = Instant::now();
            let sent = Arc::new(Mutex::new(Vec::new()));
            let callers: Vec<_> = (0..40u64)
                .map(|i| {
                    let (limiter, sent) = (limiter.clone(), sent.clone());
                    tokio::spawn(async move {
                        while start.elapsed() < Duration::from_secs(8) {
                            let place = limiter.acquire().await;
                            lock(&sent).push(Instant::now());
                            tokio::time::sleep(Duration::from_millis(20 + (i * 37) % 180)).await;
                            drop(place);
                        }
                    })
                })
                .collect();
            futures::future::join_all(callers).await;
            let (from, to) = (start + Duration::from_secs(1), start + Duration::from_secs(7));
            let n = lock(&sent).iter().filter(|t| (from..to).contains(*t)).count() as f64;
            let allowed = limiter.rate() * 6.0;
            assert!(n >= (allowed - 1.0).floor() && n <= allowed + 1.0, "{n} requests in 6 s at {rate}/s, {allowed} allowed");
        }
    }

    /// Callers that give up together, each after taking the next slot, leave
    /// those slots to whoever comes next: the rate they leave unspent is not
    /// pushed out to the callers after them.
    #[tokio::test(start_paused = true)]
    async fn callers_that_give_up_leave_their_slots_to_the_next() {
        for concurrency_limit in [1, 0] {
            let limiter = Arc::new(Limiter::whole(&ProviderLimits { rate_limit: 5.0, concurrency_limit }, 1.0));
            drop(limiter.acquire().await);
            let start = Instant::now();
            let impatient: Vec<_> = (0..30)
                .map(|_| {
                    let limiter = limiter.clone();
                    tokio::spawn(async move { tokio::time::timeout(Duration::from_millis(100), limiter.acquire()).await.is_ok() })
                })
                .collect();
            let gave_up = futures::future::join_all(impatient).await.into_iter().filter(|r| !r.as_ref().unwrap()).count();
            assert_eq!(gave_up, 30, "no slot came within 100 ms");
            let _next = limiter.acquire().await;
            assert_eq!(start.elapsed(), Duration::from_millis(200), "the next caller has the slot after the last request sent");
        }
    }

    /// However late callers wake and however the allowance changes, no
    /// window holds more than the allowed requests.
    #[tokio::test(start_paused = true)]
    async fn no_window_holds_more_than_the_allowed_requests() {
        let limiter = Arc::new(Limiter::empty(&ProviderLimits { rate_limit: 20.0, concurrency_limit: 0 }, 0.8));
        assert_eq!(limiter.window(), Duration::from_millis(1250));
        limiter.set_rate(10.0);
        let start = Instant::now();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let callers: Vec<_> = (0..60)
            .map(|_| {
                let (limiter, sent) = (limiter.clone(), sent.clone());
                tokio::spawn(async move {
                    let _ = limiter.acquire().await;
                    lock(&sent).push(Instant::now());
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1900)).await;
        limiter.set_rate(4.0);
        tokio::time::sleep(Duration::from_millis(2000)).await;
        limiter.set_rate(10.0);
        futures::future::join_all(callers).await;
        let sent = lock(&sent).clone();
        assert_eq!(sent.len(), 60);
        let (lowered, raised, window) = (start + Duration::from_millis(1900), start + Duration::from_millis(3900), limiter.window());
        for (i, t) in sent.iter().enumerate() {
            let within = sent[i..].iter().filter(|u| **u < *t + window).count();
            // The slots were all handed out at the first rate; the window still holds to the lower one.
            let allowed = if *t >= lowered && *t + window <= raised { 4 } else { 10 };
            assert!(within <= allowed, "{within} requests within one window from {:?}", *t - start);
        }
        assert!((limiter.rate() - 8.0).abs() < 1e-9, "10 requests every 1.25 s");
    }
}
