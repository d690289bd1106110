//! Fault-injection drivers shared by the transports' `faults` tests: a broker restarted
//! (kill -9) twice under publishing load, condition polling, and the `RESULT` lines the
//! figures in RELIABILITY.md are copied from.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busway::{
    Bus, ErrorKind, Health, Message, Overflow, Pattern, SubscribeOptions, Subscription, Topic,
};

use crate::nats::NatsServer;
use crate::redis::RedisServer;

/// A broker a fault test can kill, restart, freeze and thaw.
pub trait Broker: Send + 'static {
    /// SIGKILL, and wait for the process to exit.
    fn kill(&mut self);
    /// Start again on the same port and data dir; returns once it listens.
    fn restart(&mut self);
    /// SIGSTOP: connections stay open, nothing answers.
    fn pause(&mut self);
    /// SIGCONT.
    fn resume(&mut self);
}

impl Broker for RedisServer {
    fn kill(&mut self) {
        RedisServer::kill(self);
    }
    fn restart(&mut self) {
        RedisServer::restart(self);
    }
    fn pause(&mut self) {
        RedisServer::pause(self);
    }
    fn resume(&mut self) {
        RedisServer::resume(self);
    }
}

impl Broker for NatsServer {
    fn kill(&mut self) {
        NatsServer::kill(self);
    }
    fn restart(&mut self) {
        NatsServer::restart(self);
    }
    fn pause(&mut self) {
        self.process().pause();
    }
    fn resume(&mut self) {
        self.process().resume();
    }
}

/// What the run promises about delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarantee {
    /// Stream mode: every publish that returned `Ok` must be delivered (at least once).
    AtLeastOnce,
    /// Broadcast mode: losses during an outage are allowed, and counted.
    AtMostOnce,
}

/// The shape of a restart-under-load run.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// Concurrent publisher tasks.
    pub publishers: usize,
    /// Messages in total (split evenly).
    pub total: usize,
    /// Pause between two publishes of one publisher, so the run lasts a few seconds and
    /// the kills land inside it.
    pub pace: Duration,
    /// Fractions of `total` (publishes started) at which the broker is killed and restarted.
    pub kills_at: Vec<f64>,
    /// Topic every message is published on.
    pub topic: String,
}

impl Default for LoadPlan {
    fn default() -> Self {
        LoadPlan {
            publishers: 100,
            total: 10_000,
            pace: Duration::from_millis(40),
            kills_at: vec![1.0 / 3.0, 0.5],
            topic: "load.orders".to_string(),
        }
    }
}

/// The figures of one restart-under-load run.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// The transport label (`redis-broadcast`, `nats-jetstream`...).
    pub transport: String,
    /// Publishes attempted.
    pub attempted: usize,
    /// Publishes that returned `Ok`.
    pub ok_publishes: usize,
    /// Failed publishes by error kind.
    pub failures: BTreeMap<String, usize>,
    /// Distinct `Ok`'d messages delivered.
    pub delivered: usize,
    /// Deliveries beyond the first of a message.
    pub duplicates: usize,
    /// Messages delivered whose publish had failed (the broker had them anyway).
    pub delivered_not_ok: usize,
    /// `Ok`'d messages never delivered.
    pub lost: usize,
    /// Per restart: time from the broker listening again to the bus reporting `up`.
    pub reconnect_ms: Vec<u128>,
    /// Wall time of the publishing phase.
    pub publish_ms: u128,
    /// Examples of lost message ids (at most 10).
    pub lost_examples: Vec<String>,
    /// The first error message of each failure kind.
    pub failure_examples: BTreeMap<String, String>,
}

impl LoadReport {
    /// Prints the `RESULT` line and asserts what `guarantee` promises. At least once: every
    /// publish that returned `Ok` was delivered. At most once: the bus was back within 2 s of
    /// each broker return, delivery resumed, and the counted losses stay far below the total
    /// (only what was published while the subscriber's connection was down may be lost).
    pub fn check(&self, guarantee: Guarantee) {
        self.print();
        match guarantee {
            Guarantee::AtLeastOnce => {
                assert_eq!(
                    self.lost, 0,
                    "Ok'd publishes never delivered, e.g. {:?}: {self}",
                    self.lost_examples
                );
                assert!(self.ok_publishes > 0, "{self}");
            }
            Guarantee::AtMostOnce => {
                for ms in &self.reconnect_ms {
                    assert!(
                        *ms <= 2_000,
                        "reconnected {ms} ms after the broker's return (limit 2 s): {self}"
                    );
                }
                assert!(self.delivered > 0, "{self}");
                assert!(self.lost < self.ok_publishes / 2, "{self}");
            }
        }
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let failures: Vec<String> = self
            .failures
            .iter()
            .map(|(k, n)| format!("{k}:{n}"))
            .collect();
        write!(
            f,
            "RESULT {} attempted={} ok_publishes={} failed={} delivered={} duplicates={} delivered_not_ok={} lost={} reconnect_ms={:?} publish_ms={}",
            self.transport,
            self.attempted,
            self.ok_publishes,
            if failures.is_empty() {
                "0".to_string()
            } else {
                failures.join(",")
            },
            self.delivered,
            self.duplicates,
            self.delivered_not_ok,
            self.lost,
            self.reconnect_ms,
            self.publish_ms
        )
    }
}

impl LoadReport {
    /// Prints the `RESULT` line, then the first error of each failure kind and a few lost ids.
    pub fn print(&self) {
        println!("{self}");
        for (kind, message) in &self.failure_examples {
            println!("  first {kind} error: {message}");
        }
        if !self.lost_examples.is_empty() {
            println!("  lost, e.g.: {:?}", self.lost_examples);
        }
    }
}

/// Polls `cond` every 10 ms until it holds; `Err(elapsed)` after `limit`. For blocking
/// threads (the broker controller).
pub fn poll_blocking(
    limit: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<Duration, Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `cond` every 10 ms until it holds, panicking with `what` after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Kills the broker, waits for `bus` to notice, restarts it and measures how long `bus`
/// takes to report `up` again (with one more reconnect) after the broker listens.
///
/// # Panics
/// When the bus does not notice the outage within 10 s or does not recover within 15 s.
pub fn kill_restart_and_time<B: Broker>(broker: &mut B, bus: &dyn Bus) -> Duration {
    let before = bus.stats().reconnects;
    broker.kill();
    poll_blocking(Duration::from_secs(10), || bus.stats().health != Health::Up)
        .unwrap_or_else(|t| panic!("bus {:?} did not notice the kill within {t:?}", bus.name()));
    broker.restart();
    poll_blocking(Duration::from_secs(15), || {
        let s = bus.stats();
        s.health == Health::Up && s.reconnects > before
    })
    .unwrap_or_else(|t| {
        panic!(
            "bus {:?} did not reconnect within {t:?} of the broker's return: {}",
            bus.name(),
            bus.stats()
        )
    })
}

#[derive(Default)]
struct Seen {
    counts: HashMap<String, u32>,
}

/// Reads `sub` into a shared map of payload -> deliveries, acking stream deliveries.
fn collect(mut sub: Subscription) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(d) = sub.recv().await {
            let id = String::from_utf8_lossy(&d.message().payload).into_owned();
            *out.lock().unwrap().counts.entry(id).or_default() += 1;
            if d.is_ackable() {
                // An ack lost in an outage only means a redelivery (counted as a duplicate).
                let _ = d.ack().await;
            }
        }
    });
    (seen, task)
}

/// Runs `plan`: its publishers publish on `bus` while the broker is killed (-9) and
/// restarted at each `kills_at` fraction; `sub` (already subscribed to the topic) collects.
///
/// At-least-once: waits (up to 60 s) until every `Ok`'d message was delivered. At-most-once:
/// after the run, publishes probes until one arrives -- everything published before it on the
/// bus's one connection has then arrived or is lost -- and counts the losses.
/// Returns the report and the broker (for further checks).
///
/// # Panics
/// When the broker cannot be restarted, the bus does not recover (see
/// [`kill_restart_and_time`]), or delivery never resumes.
pub async fn restart_under_load<B: Broker>(
    transport: &str,
    bus: Arc<dyn Bus>,
    sub: Subscription,
    broker: B,
    plan: LoadPlan,
    guarantee: Guarantee,
) -> (LoadReport, B) {
    let topic = Topic::new(&plan.topic).expect("plan topic");
    let (seen, collector) = collect(sub);
    let attempted = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));

    let controller = {
        let bus = bus.clone();
        let attempted = attempted.clone();
        let done = done.clone();
        let thresholds: Vec<u64> = plan
            .kills_at
            .iter()
            .map(|f| (plan.total as f64 * f) as u64)
            .collect();
        let mut broker = broker;
        tokio::task::spawn_blocking(move || {
            let mut times = Vec::new();
            for at in thresholds {
                let reached = poll_blocking(Duration::from_secs(60), || {
                    attempted.load(Relaxed) >= at || done.load(Relaxed)
                });
                assert!(reached.is_ok(), "publishing stalled before {at}");
                if done.load(Relaxed) {
                    panic!("the run ended before the kill at {at}; slow the pace");
                }
                times.push(kill_restart_and_time(&mut broker, bus.as_ref()));
            }
            (broker, times)
        })
    };

    let started = Instant::now();
    let per = plan.total / plan.publishers;
    let mut tasks = Vec::new();
    for p in 0..plan.publishers {
        let bus = bus.clone();
        let topic = topic.clone();
        let attempted = attempted.clone();
        let pace = plan.pace;
        let publishers = plan.publishers as u32;
        tasks.push(tokio::spawn(async move {
            let mut ok = Vec::with_capacity(per);
            let mut failed: Vec<(String, String)> = Vec::new();
            // Spread the publishers' phases so they do not publish in lockstep.
            tokio::time::sleep(pace * p as u32 / publishers).await;
            for i in 0..per {
                let id = format!("p{p:03}-{i:04}");
                attempted.fetch_add(1, Relaxed);
                match bus.publish(Message::new(topic.clone(), id.clone())).await {
                    Ok(()) => ok.push(id),
                    Err(e) => failed.push((e.kind().as_str().to_string(), e.to_string())),
                }
                tokio::time::sleep(pace).await;
            }
            (ok, failed)
        }));
    }
    let mut ok_ids = Vec::new();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut failure_examples: BTreeMap<String, String> = BTreeMap::new();
    for t in tasks {
        let (ok, failed) = t.await.expect("publisher task");
        ok_ids.extend(ok);
        for (k, message) in failed {
            *failures.entry(k.clone()).or_default() += 1;
            failure_examples.entry(k).or_insert(message);
        }
    }
    let publish_ms = started.elapsed().as_millis();
    done.store(true, Relaxed);
    let (broker, times) = controller.await.expect("broker controller");

    match guarantee {
        Guarantee::AtLeastOnce => {
            let limit = Duration::from_secs(60);
            let start = Instant::now();
            loop {
                let missing = {
                    let s = seen.lock().unwrap();
                    ok_ids
                        .iter()
                        .filter(|id| !s.counts.contains_key(*id))
                        .count()
                };
                if missing == 0 || start.elapsed() > limit {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Guarantee::AtMostOnce => {
            let limit = Duration::from_secs(15);
            let start = Instant::now();
            let mut n = 0;
            loop {
                let probe = format!("probe-{n}");
                n += 1;
                let _ = bus.publish(Message::new(topic.clone(), probe)).await;
                let arrived = wait_probe(&seen, Duration::from_millis(300)).await;
                if arrived {
                    break;
                }
                assert!(
                    start.elapsed() < limit,
                    "{transport}: delivery did not resume within {limit:?} after the restarts"
                );
            }
        }
    }
    collector.abort();

    let s = seen.lock().unwrap();
    let mut report = LoadReport {
        transport: transport.to_string(),
        attempted: attempted.load(Relaxed) as usize,
        ok_publishes: ok_ids.len(),
        failures,
        failure_examples,
        reconnect_ms: times.iter().map(|t| t.as_millis()).collect(),
        publish_ms,
        ..LoadReport::default()
    };
    let mut ok_set = std::collections::HashSet::with_capacity(ok_ids.len());
    for id in &ok_ids {
        ok_set.insert(id.as_str());
        match s.counts.get(id) {
            Some(&n) => {
                report.delivered += 1;
                report.duplicates += (n - 1) as usize;
            }
            None => {
                report.lost += 1;
                if report.lost_examples.len() < 10 {
                    report.lost_examples.push(id.clone());
                }
            }
        }
    }
    for (id, &n) in &s.counts {
        if !id.starts_with("probe-") && !ok_set.contains(id.as_str()) {
            report.delivered_not_ok += 1;
            report.duplicates += (n - 1) as usize;
        }
    }
    (report, broker)
}

async fn wait_probe(seen: &Arc<Mutex<Seen>>, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if seen
            .lock()
            .unwrap()
            .counts
            .keys()
            .any(|k| k.starts_with("probe-"))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Resident set size of this process in KiB (Linux `/proc/self/status`), if readable.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Messages per timed round of [`slow_consumer_with_dropping_policy`].
pub const SLOW_N: usize = 20_000;
/// Timed rounds per configuration (the median is printed).
const SLOW_ROUNDS: usize = 3;
/// How long a subscriber may wait for one expected message.
const SLOW_WAIT: Duration = Duration::from_secs(10);

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Publishes `n` messages on `topic` and returns how long until `fast` had all of them, in
/// order (panics on a loss).
async fn publish_and_drain(
    bus: &Arc<dyn Bus>,
    fast: &mut Subscription,
    topic: &Topic,
    n: usize,
) -> Duration {
    let start = Instant::now();
    let publisher = {
        let bus = bus.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            for i in 0..n {
                bus.publish(Message::new(topic.clone(), i.to_string()))
                    .await
                    .unwrap();
            }
            bus.flush().await.unwrap();
        })
    };
    for i in 0..n {
        let d = fast
            .recv_timeout(SLOW_WAIT)
            .await
            .unwrap_or_else(|e| panic!("fast subscriber got {i} of {n}: {e}"))
            .expect("open");
        assert_eq!(
            d.message().payload,
            i.to_string().as_bytes(),
            "in order, none lost"
        );
    }
    let took = start.elapsed();
    publisher.await.unwrap();
    took
}

/// A subscriber that stops reading, under `drop_newest`, next to one that reads: asserts the
/// reading one gets every message in order and the stalled one holds exactly its capacity with
/// every other message counted as dropped; prints (never asserts) the reading subscriber's
/// throughput alone, beside a second reading subscriber, and beside the stalled one, as a
/// `RESULT <label> slow_consumer ...` line for RELIABILITY.md.
pub async fn slow_consumer_with_dropping_policy(bus: Arc<dyn Bus>, label: &str) {
    let t = Topic::new("slow.t").unwrap();
    let pattern = Pattern::exact(&t);
    let mut fast = bus
        .subscribe(pattern.clone(), SubscribeOptions::new().capacity(SLOW_N))
        .await
        .unwrap();
    // Warm-up, then the baseline without a stalled subscriber.
    publish_and_drain(&bus, &mut fast, &t, 1_000).await;
    let mut alone = Vec::new();
    for _ in 0..SLOW_ROUNDS {
        alone.push(publish_and_drain(&bus, &mut fast, &t, SLOW_N).await);
    }
    // Control: a second subscriber that reads (the cost of a second subscriber alone).
    let mut reader = bus
        .subscribe(pattern.clone(), SubscribeOptions::new().capacity(SLOW_N))
        .await
        .unwrap();
    let reading = tokio::spawn(async move {
        let mut n = 0;
        while reader
            .recv_timeout(SLOW_WAIT)
            .await
            .ok()
            .flatten()
            .is_some()
        {
            n += 1;
            if n == SLOW_ROUNDS * SLOW_N {
                break;
            }
        }
        n
    });
    let mut with_reader = Vec::new();
    for _ in 0..SLOW_ROUNDS {
        with_reader.push(publish_and_drain(&bus, &mut fast, &t, SLOW_N).await);
    }
    assert_eq!(
        reading.await.unwrap(),
        SLOW_ROUNDS * SLOW_N,
        "the reading subscriber got all"
    );

    let capacity = 100;
    let stalled = bus
        .subscribe(
            pattern,
            SubscribeOptions::new()
                .capacity(capacity)
                .overflow(Overflow::DropNewest),
        )
        .await
        .unwrap();
    let mut with = Vec::new();
    for _ in 0..SLOW_ROUNDS {
        with.push(publish_and_drain(&bus, &mut fast, &t, SLOW_N).await);
    }
    let total = (SLOW_ROUNDS * SLOW_N) as u64;
    wait_until(
        "the stalled subscriber's drops to be counted",
        SLOW_WAIT,
        || stalled.stats().dropped + stalled.pending() as u64 >= total,
    )
    .await;
    assert_eq!(stalled.pending(), capacity, "holds at most its capacity");
    assert_eq!(stalled.stats().dropped, total - capacity as u64);
    let (alone, with_reader, with) = (median(alone), median(with_reader), median(with));
    let ratio = alone.as_secs_f64() / with.as_secs_f64();
    let reader_ratio = with_reader.as_secs_f64() / with.as_secs_f64();
    println!(
        "RESULT {label} slow_consumer policy=drop_newest n={SLOW_N} rounds={SLOW_ROUNDS} median_alone_ms={} median_with_reading_sub_ms={} median_with_stalled_sub_ms={} ratio_vs_alone={ratio:.2} ratio_vs_reading_sub={reader_ratio:.2} stalled_dropped={} stalled_pending={}",
        alone.as_millis(),
        with_reader.as_millis(),
        with.as_millis(),
        stalled.stats().dropped,
        stalled.pending()
    );
}

/// Slack on top of a configured timeout, for a loaded 2-core machine.
pub const HUNG_SLACK: Duration = Duration::from_millis(1_500);

/// Checks the error an operation gave while the broker was frozen (SIGSTOP): a timeout or
/// connection error, naming the bus (`"<bus>"`), within `limit` + [`HUNG_SLACK`]. Prints a
/// `RESULT <label>-hung <what> ...` line for RELIABILITY.md.
pub fn check_hung_error(
    label: &str,
    what: &str,
    bus: &str,
    err: &busway::Error,
    took: Duration,
    limit: Duration,
) {
    println!(
        "RESULT {label}-hung {what} kind={:?} after_ms={} error={err}",
        err.kind(),
        took.as_millis()
    );
    assert!(
        matches!(
            err.kind(),
            busway::ErrorKind::Timeout | busway::ErrorKind::Connection
        ),
        "{what}: {err}"
    );
    assert!(
        err.to_string().contains(&format!("{bus:?}")),
        "{what}: names the bus: {err}"
    );
    assert!(
        took <= limit + HUNG_SLACK,
        "{what}: took {took:?}, limit {limit:?}"
    );
}

/// How long a fault test may take before [`within`] fails it: a hang fails instead of
/// blocking the run.
pub const TEST_LIMIT: Duration = Duration::from_secs(120);

/// Runs `f`, failing the test with `what` if it takes longer than [`TEST_LIMIT`].
pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: the test hung for {TEST_LIMIT:?}"))
}

/// Publishes on `topic` from `tasks` concurrent publishers until `bus.close()` is called
/// after `before_close` publishes returned Ok; every publish that loses the race must fail
/// with `Closed`. Returns the payloads of every publish that returned Ok, for the caller to
/// find on the broker.
pub async fn publish_then_close(
    bus: Arc<dyn Bus>,
    topic: &Topic,
    tasks: usize,
    before_close: usize,
) -> HashSet<String> {
    let ok_count = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for p in 0..tasks {
        let bus = bus.clone();
        let ok_count = ok_count.clone();
        let topic = topic.clone();
        handles.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            for i in 0.. {
                let id = format!("c{p}-{i}");
                match bus.publish(Message::new(topic.clone(), id.clone())).await {
                    Ok(()) => {
                        ok.push(id);
                        ok_count.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
                        break;
                    }
                }
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            ok
        }));
    }
    wait_until("publishes before close", Duration::from_secs(30), || {
        ok_count.load(Relaxed) >= before_close as u64
    })
    .await;
    bus.close().await.expect("close flushes");
    let mut all = HashSet::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all
}
