//! `busway demo`: a market-data feed and the platform's seven engines, wired only through
//! topics on a router, then a report per engine and per bus, and the migration check: no
//! engine uses the `main` bus.

pub mod engines;
pub mod feed;
pub mod messages;
mod progress;
pub mod tracked;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busway::{Bus, Config, Error, ErrorKind, Pattern, Registry, Result, Router, StatsSnapshot};
use futures::stream::{SelectAll, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::commands::ctrl_c_handler;
use crate::text::table;
use engines::{Engine, ENGINES};
use feed::Feed;
use tracked::{TrackedBus, Usage, UsageCounts};

/// The built-in config: every bus in memory (also shipped as `examples/demo.toml`).
pub const DEMO_CONFIG: &str = include_str!("../../../examples/demo.toml");
/// The bus the migration moved engines off.
pub const MAIN_BUS: &str = "main";
/// How long the demo waits for engines to finish in-flight work after the feed stops.
const DRAIN_LIMIT: Duration = Duration::from_secs(3);
/// The engines count as idle when nothing arrived for this long.
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// What `busway demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The config file; `None` for [`DEMO_CONFIG`].
    pub config: Option<PathBuf>,
    /// How long the feed runs.
    pub duration: Duration,
    /// The engines to run (`None`: all seven).
    pub engines: Option<Vec<String>>,
    /// Whether this process runs the market-data feed.
    pub feed: bool,
    /// Symbols the feed quotes.
    pub symbols: usize,
    /// Feed ticks per second (each tick quotes every symbol).
    pub rate: f64,
    /// Show a progress line on stderr while the feed runs (for a terminal).
    pub progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            config: None,
            duration: Duration::from_secs(5),
            engines: None,
            feed: true,
            symbols: 8,
            rate: 20.0,
            progress: false,
        }
    }
}

/// Loads the demo's config: the file, or the built-in one; `BUSWAY_*` overrides apply to both.
///
/// # Errors
/// A config error naming the file, key and reason.
pub fn load_config(path: Option<&std::path::Path>) -> Result<Config> {
    match path {
        Some(p) => Config::load(p),
        None => {
            let mut c = Config::from_toml(DEMO_CONFIG, "<built-in demo config>")?;
            c.apply_env(std::env::vars())?;
            Ok(c)
        }
    }
}

fn pick_engines(names: Option<&[String]>) -> Result<Vec<Box<dyn Engine>>> {
    let known = || ENGINES.map(|(n, _)| n).join(", ");
    let Some(names) = names else {
        return Ok(ENGINES
            .iter()
            .filter_map(|(n, _)| engines::engine(n))
            .collect());
    };
    let mut seen = BTreeSet::new();
    let mut picked = Vec::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        let engine = engines::engine(name).ok_or_else(|| {
            Error::new(
                ErrorKind::Other,
                format!(
                    "--engines: unknown engine {name:?}; the engines are: {}",
                    known()
                ),
            )
        })?;
        if seen.insert(name.to_string()) {
            picked.push(engine);
        }
    }
    Ok(picked)
}

/// One row of the engine table.
#[derive(Debug, Clone)]
pub struct EngineRow {
    /// Engine name (or `feed`).
    pub name: String,
    /// Service port; `None` for the feed.
    pub port: Option<u16>,
    /// Messages received.
    pub received: u64,
    /// Messages published.
    pub published: u64,
    /// Deliveries it acked (every one it handled, unless the ack failed).
    pub acked: u64,
    /// Buses it subscribed on.
    pub subscribes_on: Vec<String>,
    /// Buses it published to.
    pub publishes_to: Vec<String>,
    /// Subscriptions on `main`, plus one if it published there: the connections this engine
    /// would hold to `main` as its own process.
    pub main_connections: u64,
    /// Messages it published to or received from `main`.
    pub main_messages: u64,
    /// Errors (publish failures, undecodable payloads).
    pub errors: u64,
    /// The first error.
    pub first_error: Option<String>,
    /// What it did.
    pub summary: String,
}

/// One row of the bus table.
#[derive(Debug, Clone)]
pub struct BusRow {
    /// Bus name.
    pub name: String,
    /// Transport kind.
    pub transport: String,
    /// The bus's counters at the end of the run (before close).
    pub stats: StatsSnapshot,
    /// Median publish -> deliver latency in µs, when anything was delivered.
    pub p50_us: Option<u64>,
    /// 99th percentile publish -> deliver latency in µs.
    pub p99_us: Option<u64>,
    /// Latency samples.
    pub samples: u64,
}

/// The outcome of a demo run.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Where the config came from.
    pub config_source: String,
    /// How long the feed ran.
    pub elapsed: Duration,
    /// Stopped early by Ctrl-C.
    pub interrupted: bool,
    /// Per engine (and the feed).
    pub engines: Vec<EngineRow>,
    /// Per bus.
    pub buses: Vec<BusRow>,
    /// Publishes that returned `Ok`, per bus they went to (a mirrored topic counts on each
    /// of its buses), over the feed and every engine. Each is on its broker once the run
    /// ends: the demo flushes and closes the router before reporting.
    pub ok_publishes: BTreeMap<String, u64>,
    /// The migration check passed: no engine holds a connection to `main` or sent traffic
    /// through it.
    pub pass: bool,
    /// Why the check passed or failed.
    pub verdict: String,
    /// What went wrong flushing and closing the router at the end (a broker gone or
    /// frozen): the publishes counted as Ok may then not all be on their brokers.
    pub unflushed: Option<String>,
}

struct Running {
    name: String,
    port: Option<u16>,
    usage: Arc<Usage>,
    task: JoinHandle<String>,
}

/// Runs the demo until `options.duration` passes or Ctrl-C, then reports.
///
/// # Errors
/// A bad config, unknown engine or transport, a bus that cannot be built, or a refused
/// subscription. Errors while running are counted per engine and shown in the report.
pub async fn run(options: &DemoOptions, registry: &Registry) -> Result<DemoReport> {
    let config = load_config(options.config.as_deref())?;
    registry.validate(&config)?;
    let engines = pick_engines(options.engines.as_deref())?;
    let router = Arc::new(Router::from_config(&config, registry).await?);
    // With a config file, SIGHUP reloads it while the engines run.
    let reloader = match &options.config {
        Some(path) => {
            match crate::commands::reload_on_hangup(router.clone(), path.clone(), registry.clone())
            {
                Ok(task) => Some(task),
                Err(e) => {
                    let _ = router.close().await;
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let result = run_with(options, &config, router.clone(), engines).await;
    if let Some(task) = reloader {
        task.abort();
    }
    // The final consumer lag, read from the brokers while the router is still connected,
    // then the final counters once it is closed: for an exporter that keeps serving after
    // the run (`--metrics-hold`).
    if busway::metrics::enabled() {
        busway::metrics::collect_lag().await;
    }
    let closed = router.close().await;
    busway::metrics::collect();
    let mut report = result?;
    if let Err(e) = closed {
        report
            .unflushed
            .get_or_insert_with(|| format!("close: {e}"));
    }
    Ok(report)
}

async fn run_with(
    options: &DemoOptions,
    config: &Config,
    router: Arc<Router>,
    engines: Vec<Box<dyn Engine>>,
) -> Result<DemoReport> {
    // Installed once, before anything is published, and kept to the end: a Ctrl-C at any
    // later moment stops the run the graceful way (feed first, engines drained, router
    // flushed and closed) instead of ending the process with publishes still queued.
    let mut interrupt = ctrl_c_handler()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let tracked = |usage: &Arc<Usage>| -> Arc<dyn Bus> {
        Arc::new(TrackedBus::new(router.clone(), usage.clone()))
    };

    // Every engine subscribes before the feed starts, so none misses the first ticks.
    let mut running = Vec::new();
    for engine in engines {
        let usage = Arc::new(Usage::default());
        let bus = tracked(&usage);
        let mut subs = SelectAll::new();
        for (pattern, opts) in engine.subscriptions() {
            let sub = bus
                .subscribe(Pattern::new(pattern)?, opts)
                .await
                .map_err(|e| e.context(format!("engine {}", engine.name())))?;
            subs.push(sub);
        }
        running.push(Running {
            name: engine.name().to_string(),
            port: Some(engine.port()),
            usage: usage.clone(),
            task: tokio::spawn(engine_loop(engine, bus, subs, usage, stop_rx.clone())),
        });
    }

    let (feed_stop_tx, feed_stop_rx) = watch::channel(false);
    let feed = if options.feed {
        let usage = Arc::new(Usage::default());
        let bus = tracked(&usage);
        let task = tokio::spawn(feed_loop(
            Feed::new(options.symbols.max(1), 42),
            options.rate,
            bus,
            usage.clone(),
            feed_stop_rx,
        ));
        Some(Running {
            name: "feed".to_string(),
            port: None,
            usage,
            task,
        })
    } else {
        None
    };

    eprintln!(
        "busway: demo running: {} engines{}; Ctrl-C stops it and flushes what was published",
        running.len(),
        if feed.is_some() { " and the feed" } else { "" }
    );
    let started = Instant::now();
    let progress = options
        .progress
        .then(|| progress::Progress::start(router.clone(), options.duration));
    let interrupted = tokio::select! {
        _ = tokio::time::sleep(options.duration) => false,
        r = interrupt.recv() => r.is_some(),
    };
    let elapsed = started.elapsed();
    drop(progress);

    // Stop the feed first, let the engines finish what is in flight, then stop them.
    let _ = feed_stop_tx.send(true);
    let mut finished = Vec::new();
    if let Some(f) = feed {
        let summary = f.task.await.unwrap_or_else(|e| format!("failed: {e}"));
        finished.push((f.name, f.port, f.usage, summary));
    }
    drain(&running).await;
    let _ = stop_tx.send(true);
    for r in running {
        let summary = r.task.await.unwrap_or_else(|e| format!("failed: {e}"));
        finished.push((r.name, r.port, r.usage, summary));
    }
    // A broker that is gone or frozen fails the flush: the report still shows what ran.
    let unflushed = router.flush().await.err().map(|e| format!("flush: {e}"));

    let mut latency: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
    let mut ok_publishes: BTreeMap<String, u64> = router
        .buses()
        .into_iter()
        .map(|(name, _)| (name, 0))
        .collect();
    let mut rows = Vec::new();
    for (name, port, usage, summary) in finished {
        let u = usage.lock();
        for (bus, n) in &u.published {
            *ok_publishes.entry(bus.clone()).or_default() += n;
        }
        for (bus, h) in &u.latency {
            match latency.get_mut(bus) {
                Some(all) => {
                    // Same bounds everywhere, so adding cannot fail.
                    let _ = all.add(h);
                }
                None => {
                    latency.insert(bus.clone(), h.clone());
                }
            }
        }
        rows.push(engine_row(&name, port, &u, summary));
    }

    let buses: Vec<BusRow> = router
        .buses()
        .into_iter()
        .map(|(name, bus)| {
            let h = latency.get(&name);
            let pct = |q: f64| h.filter(|h| !h.is_empty()).map(|h| h.value_at_quantile(q));
            BusRow {
                transport: config
                    .buses
                    .get(&name)
                    .map_or_else(String::new, |b| b.transport.clone()),
                stats: bus.stats(),
                p50_us: pct(0.50),
                p99_us: pct(0.99),
                samples: h.map_or(0, |h| h.len()),
                name,
            }
        })
        .collect();
    let (pass, verdict) = migration_check(config, &rows);
    Ok(DemoReport {
        config_source: config.source.clone(),
        elapsed,
        interrupted,
        engines: rows,
        buses,
        ok_publishes,
        pass,
        verdict,
        unflushed,
    })
}

/// Waits until no engine has received anything for [`DRAIN_QUIET`], at most [`DRAIN_LIMIT`].
async fn drain(running: &[Running]) {
    let total = || -> u64 {
        running
            .iter()
            .map(|r| r.usage.lock().total_received())
            .sum()
    };
    let deadline = Instant::now() + DRAIN_LIMIT;
    let mut last = total();
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let now = total();
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= DRAIN_QUIET {
            break;
        }
    }
}

/// One engine: takes deliveries from all its subscriptions in arrival order, hands each to
/// the engine, publishes what it returns and acks. Returns the engine's summary.
async fn engine_loop(
    mut engine: Box<dyn Engine>,
    bus: Arc<dyn Bus>,
    mut subs: SelectAll<busway::Subscription>,
    usage: Arc<Usage>,
    mut stop: watch::Receiver<bool>,
) -> String {
    let mut out = Vec::new();
    loop {
        let delivery = tokio::select! {
            biased;
            _ = stop.changed() => break,
            d = subs.next() => match d {
                Some(d) => d,
                None => break,
            },
        };
        // The handling's span (when tracing wants it), and its trace context carried into
        // what the engine publishes in response: one trace follows a quote through engines.
        let handling = busway::trace::handling(delivery.message(), engine.name());
        if let Err(e) = handling
            .span()
            .in_scope(|| engine.handle(delivery.message(), &mut out))
        {
            usage.error(&e);
        }
        for mut message in out.drain(..) {
            handling.propagate(&mut message);
            let publish = bus.publish(message).instrument(handling.span().clone());
            if let Err(e) = publish.await {
                usage.error(&e);
            }
        }
        match delivery.ack().await {
            Ok(()) => usage.lock().acked += 1,
            Err(e) => usage.error(&e),
        }
    }
    engine.summary()
}

/// The feed: `rate` ticks per second until stopped. Returns its summary.
async fn feed_loop(
    mut feed: Feed,
    rate: f64,
    bus: Arc<dyn Bus>,
    usage: Arc<Usage>,
    mut stop: watch::Receiver<bool>,
) -> String {
    let period = Duration::from_secs_f64(1.0 / rate.clamp(0.1, 100_000.0));
    let mut ticker = tokio::time::interval(period);
    // A slow consumer under `block` can hold the feed back; then it skips ticks rather
    // than bursting to catch up.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut ticks = 0u64;
    let mut out = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = ticker.tick() => {}
        }
        if let Err(e) = feed.tick(&mut out) {
            usage.error(&e);
        }
        for message in out.drain(..) {
            if let Err(e) = bus.publish(message).await {
                usage.error(&e);
            }
        }
        ticks += 1;
    }
    format!(
        "{ticks} ticks x {} symbols ({})",
        feed.symbols().count(),
        feed.symbols().take(4).collect::<Vec<_>>().join(", ")
            + if feed.symbols().count() > 4 {
                ", ..."
            } else {
                ""
            }
    )
}

fn engine_row(name: &str, port: Option<u16>, u: &UsageCounts, summary: String) -> EngineRow {
    let main_subs = u.subscriptions.get(MAIN_BUS).copied().unwrap_or(0);
    let main_pub = u.published.get(MAIN_BUS).copied().unwrap_or(0);
    let main_in = u.received.get(MAIN_BUS).copied().unwrap_or(0);
    EngineRow {
        name: name.to_string(),
        port,
        received: u.total_received(),
        published: u.total_published(),
        acked: u.acked,
        subscribes_on: u.subscriptions.keys().cloned().collect(),
        publishes_to: u.published.keys().cloned().collect(),
        main_connections: main_subs + u64::from(main_pub > 0),
        main_messages: main_pub + main_in,
        errors: u.errors,
        first_error: u.first_error.clone(),
        summary,
    }
}

fn migration_check(config: &Config, rows: &[EngineRow]) -> (bool, String) {
    if !config.buses.contains_key(MAIN_BUS) {
        return (
            true,
            format!("the config has no bus named {MAIN_BUS:?}, so nothing can use it"),
        );
    }
    let offenders: Vec<String> = rows
        .iter()
        .filter(|r| r.main_connections > 0 || r.main_messages > 0)
        .map(|r| {
            format!(
                "{} ({} connections, {} messages)",
                r.name, r.main_connections, r.main_messages
            )
        })
        .collect();
    if offenders.is_empty() {
        (
            true,
            format!(
                "{} engines hold 0 connections to {MAIN_BUS:?} and sent no traffic through it",
                rows.iter().filter(|r| r.port.is_some()).count()
            ),
        )
    } else {
        (
            false,
            format!("still on {MAIN_BUS:?}: {}", offenders.join(", ")),
        )
    }
}

fn dash_if_empty(v: &[String]) -> String {
    if v.is_empty() {
        "-".to_string()
    } else {
        v.join(",")
    }
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "busway demo: config {}, ran {:.1}s{}\n",
            self.config_source,
            self.elapsed.as_secs_f64(),
            if self.interrupted {
                " (stopped by a signal: Ctrl-C or SIGTERM)"
            } else {
                ""
            }
        )?;
        writeln!(f, "engines")?;
        let rows: Vec<Vec<String>> = self
            .engines
            .iter()
            .map(|e| {
                vec![
                    e.name.clone(),
                    e.port.map_or("-".to_string(), |p| p.to_string()),
                    e.received.to_string(),
                    e.published.to_string(),
                    dash_if_empty(&e.subscribes_on),
                    dash_if_empty(&e.publishes_to),
                    e.main_connections.to_string(),
                    e.errors.to_string(),
                    e.summary.clone(),
                ]
            })
            .collect();
        f.write_str(&table(
            &[
                "engine",
                "port",
                "in",
                "out",
                "subscribes on",
                "publishes to",
                "main conns",
                "errors",
                "work",
            ],
            &rows,
        ))?;
        for e in self.engines.iter().filter(|e| e.first_error.is_some()) {
            writeln!(
                f,
                "  {} first error: {}",
                e.name,
                e.first_error.as_deref().unwrap_or_default()
            )?;
        }
        writeln!(f, "\nbuses")?;
        let us = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let rows: Vec<Vec<String>> = self
            .buses
            .iter()
            .map(|b| {
                vec![
                    b.name.clone(),
                    b.transport.clone(),
                    b.stats.published.to_string(),
                    b.stats.delivered.to_string(),
                    b.stats.dropped.to_string(),
                    us(b.p50_us),
                    us(b.p99_us),
                    b.stats.connections.to_string(),
                ]
            })
            .collect();
        f.write_str(&table(
            &[
                "bus",
                "transport",
                "published",
                "delivered",
                "dropped",
                "p50 µs",
                "p99 µs",
                "connections",
            ],
            &rows,
        ))?;
        writeln!(
            f,
            "\nmigration check: {}: {}",
            if self.pass { "PASS" } else { "FAIL" },
            self.verdict
        )?;
        if let Some(why) = &self.unflushed {
            writeln!(
                f,
                "not flushed: {why} (some publishes counted as Ok may not be on their broker)"
            )?;
        }
        // One line for scripts and tests: what the brokers must hold after the run.
        let sum = |field: fn(&EngineRow) -> u64| self.engines.iter().map(field).sum::<u64>();
        write!(
            f,
            "RESULT demo interrupted={} received={} acked={} errors={} ok_publishes={}",
            self.interrupted,
            sum(|e| e.received),
            sum(|e| e.acked),
            sum(|e| e.errors),
            self.ok_publishes.values().sum::<u64>()
        )?;
        for (bus, n) in &self.ok_publishes {
            write!(f, " ok_publishes.{bus}={n}")?;
        }
        writeln!(
            f,
            " dropped={}",
            self.buses.iter().map(|b| b.stats.dropped).sum::<u64>()
        )
    }
}
