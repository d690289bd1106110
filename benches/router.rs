//! What the router adds on top of a bus, measured in the same run:
//! - publish through a `Router` on a cached topic vs straight to the same `MemoryBus`
//!   (no subscriber, and one subscriber draining on another thread);
//! - route lookup: the cached answer, a cache miss, and the table's own rule scan;
//! - pattern matching and overlap tests;
//! - dispatch on a MemoryBus with 10, 100 and 1000 wildcard subscriptions of which one
//!   matches, beside a naive scan of the same patterns per publish.
//!
//! `cargo bench -p busway --bench router`; with `--features prometheus` and
//! `BUSWAY_BENCH_METRICS=1`, the publish benches run with metrics recorded.

#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use busway::{
    router::RoutingTable, Bus, MemoryBus, Message, Overflow, Pattern, Router, SubscribeOptions,
    Topic,
};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use futures::StreamExt;

/// A table shaped like the platform's: a dozen rules, market data first, then a default.
const RULES: [&str; 12] = [
    "marketdata.quotes.*",
    "marketdata.trades.*",
    "marketdata.>",
    "features.>",
    "factor.>",
    "ml.>",
    "strategy.signals.*",
    "strategy.>",
    "websocket.>",
    "portfolio.>",
    "collateral.margin.*",
    "collateral.>",
];

fn router_over(bus: Arc<dyn Bus>, cache: usize) -> Router {
    let mut b = Router::builder()
        .bus("md", bus)
        .bus("main", Arc::new(MemoryBus::new("main")))
        .cache_capacity(cache);
    for r in RULES {
        let to: &[&str] = if r.starts_with("marketdata") {
            &["md"]
        } else {
            &["main"]
        };
        b = b.route(r, to);
    }
    b.default_to(&["main"]).build().expect("a valid table")
}

fn message() -> Message {
    Message::new(
        Topic::new("marketdata.quotes.AAPL").unwrap(),
        Bytes::from(vec![7u8; 64]),
    )
}

fn publish(c: &mut Criterion) {
    // BUSWAY_BENCH_METRICS=1 (with `--features prometheus`): the same benches with a
    // Prometheus recorder installed and busway's histograms enabled.
    #[cfg(feature = "prometheus")]
    let _recorder = std::env::var_os("BUSWAY_BENCH_METRICS")
        .is_some()
        .then(|| busway::metrics::install().expect("a recorder"));
    // One worker thread for the draining subscriber; the bench loop runs on this thread.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let m = message();
    for draining in [false, true] {
        let bus = Arc::new(MemoryBus::new("md"));
        let direct: Arc<dyn Bus> = bus.clone();
        let routed: Arc<dyn Bus> = Arc::new(router_over(bus, busway::router::DEFAULT_ROUTE_CACHE));
        let _drain = draining.then(|| {
            let sub = rt
                .block_on(
                    direct.subscribe(
                        Pattern::new("marketdata.>").unwrap(),
                        SubscribeOptions::new()
                            .capacity(1024)
                            .overflow(Overflow::Block),
                    ),
                )
                .unwrap();
            rt.spawn(sub.for_each(|d| async move {
                black_box(d);
            }))
        });
        let mut g = c.benchmark_group(if draining {
            "publish/one_subscriber_draining"
        } else {
            "publish/no_subscriber"
        });
        g.bench_function("memorybus_direct", |b| {
            b.to_async(&rt).iter(|| direct.publish(m.clone()))
        });
        g.bench_function("router_cached_topic", |b| {
            b.to_async(&rt).iter(|| routed.publish(m.clone()))
        });
        g.finish();
        rt.block_on(routed.close()).unwrap();
    }
}

fn lookup(c: &mut Criterion) {
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new("md"));
    let cached = router_over(bus.clone(), busway::router::DEFAULT_ROUTE_CACHE);
    // Cache of one topic, cycling over 1024 topics: every lookup misses and inserts.
    let missing = router_over(bus, 1);
    let table: RoutingTable = cached.table();
    // Matches no rule: the scan walks all twelve before the default.
    let late = Topic::new("orders.new.AAPL").unwrap();
    let early = Topic::new("marketdata.quotes.AAPL").unwrap();
    let many: Vec<Topic> = (0..1024)
        .map(|i| Topic::new(format!("orders.new.S{i}")).unwrap())
        .collect();
    cached.route(&late).unwrap();

    let mut g = c.benchmark_group("route_lookup");
    g.bench_function("router_cached", |b| {
        b.iter(|| cached.route(black_box(&late)))
    });
    g.bench_function("router_cache_miss", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % many.len();
            missing.route(black_box(&many[i]))
        })
    });
    g.bench_function("table_scan_first_rule", |b| {
        b.iter(|| table.lookup(black_box(&early)).map(|s| s.len()))
    });
    g.bench_function("table_scan_to_default", |b| {
        b.iter(|| table.lookup(black_box(&late)).map(|s| s.len()))
    });
    g.finish();
}

fn patterns(c: &mut Criterion) {
    let topic = Topic::new("marketdata.quotes.AAPL").unwrap();
    let mut g = c.benchmark_group("pattern");
    for p in [
        "marketdata.quotes.AAPL",
        "marketdata.quotes.*",
        "marketdata.>",
        "engine.>",
    ] {
        let pattern = Pattern::new(p).unwrap();
        g.bench_function(format!("matches/{p}"), |b| {
            b.iter(|| black_box(&pattern).matches(black_box(&topic)))
        });
    }
    let (a, b2) = (
        Pattern::new("marketdata.*.AAPL").unwrap(),
        Pattern::new("marketdata.quotes.>").unwrap(),
    );
    g.bench_function("overlaps", |b| {
        b.iter(|| black_box(&a).overlaps(black_box(&b2)))
    });
    g.bench_function("covers", |b| {
        b.iter(|| black_box(&b2).covers(black_box(&a)))
    });
    g.finish();
}

/// A MemoryBus decides a topic's subscriptions once and caches the answer, so a publish
/// costs the same with 10 or 1000 subscriptions when one matches; the naive dispatcher
/// tests every pattern on every publish.
fn dispatch_many_subs(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("dispatch_many_subs");
    for n in [10usize, 100, 1000] {
        let patterns: Vec<Pattern> = (0..n)
            .map(|i| Pattern::new(format!("feed{i}.quotes.*")).unwrap())
            .collect();
        // The last subscription is the one that matches: the worst case for a scan.
        let topic = Topic::new(format!("feed{}.quotes.AAPL", n - 1)).unwrap();
        let m = Message::new(topic.clone(), Bytes::from(vec![7u8; 64]));
        let bus = MemoryBus::new("md");
        // Capacity 1, drop_oldest: the matching queue keeps its newest message, so every
        // publish costs one push whatever the run length, with no consumer task.
        let subs: Vec<_> = patterns
            .iter()
            .map(|p| {
                rt.block_on(
                    bus.subscribe(
                        p.clone(),
                        SubscribeOptions::new()
                            .capacity(1)
                            .overflow(Overflow::DropOldest),
                    ),
                )
                .unwrap()
            })
            .collect();
        g.bench_function(format!("memorybus/{n}"), |b| {
            b.to_async(&rt).iter(|| bus.publish(m.clone()))
        });
        g.bench_function(format!("naive_scan/{n}"), |b| {
            b.iter(|| {
                let m = black_box(m.clone());
                patterns.iter().filter(|p| p.matches(&m.topic)).count()
            })
        });
        drop(subs);
        rt.block_on(bus.close()).unwrap();
    }
    g.finish();
}

criterion_group!(benches, publish, lookup, patterns, dispatch_many_subs);
criterion_main!(benches);
