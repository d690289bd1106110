//! MemoryBus throughput beside the channels it competes with, in the same run, 64-byte
//! payloads throughout:
//! - one publisher -> one subscriber (queue 1024, `block`) and seven publishers -> one
//!   subscriber, against the fair in-runtime baselines (tokio `mpsc` and `flume`, bounded
//!   1024, between tokio tasks on the same runtime: multi-thread, two workers) and against
//!   crossbeam `bounded(1024)` between spinning OS threads (kept for comparison with earlier
//!   figures);
//! - one publisher -> seven subscribers against `tokio::sync::broadcast` with seven receivers.
//!
//! Every side spawns its publishers and subscribers as tasks (threads for crossbeam) and is
//! timed from the first publish until every subscriber has every message.
//!
//! `cargo bench -p busway --bench memory`

#![allow(missing_docs)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busway::{Bus, MemoryBus, Message, Overflow, Pattern, SubscribeOptions, Topic};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};

const N: u64 = 50_000;
/// Publishers of the fan-in shape, subscribers of the fan-out shape.
const WIDE: usize = 7;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn payload() -> Bytes {
    Bytes::from(vec![7u8; 64])
}

/// Each of `publishers` publishers' share of `N`.
fn share(publishers: usize, i: usize) -> u64 {
    N / publishers as u64 + u64::from((i as u64) < N % publishers as u64)
}

/// Publishes N messages on one MemoryBus from `publishers` tasks to `subs` subscriber tasks
/// and waits until every subscriber has all of them.
async fn memorybus_run(publishers: usize, subs: usize, capacity: usize) -> Duration {
    let bus = Arc::new(MemoryBus::new("bench"));
    let topic = Topic::new("marketdata.quotes.AAPL").unwrap();
    let mut readers = Vec::new();
    for _ in 0..subs {
        let mut sub = bus
            .subscribe(
                Pattern::exact(&topic),
                SubscribeOptions::new()
                    .capacity(capacity)
                    .overflow(Overflow::Block),
            )
            .await
            .unwrap();
        readers.push(tokio::spawn(async move {
            for _ in 0..N {
                sub.recv().await.expect("delivery");
            }
        }));
    }
    let start = Instant::now();
    let writers: Vec<_> = (0..publishers)
        .map(|i| {
            let bus = bus.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                let body = payload();
                for _ in 0..share(publishers, i) {
                    bus.publish(Message::new(topic.clone(), body.clone()))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    for r in readers {
        r.await.unwrap();
    }
    let took = start.elapsed();
    bus.close().await.unwrap();
    took
}

/// `publishers` tasks -> one receiver task over a tokio `mpsc::channel(1024)`.
async fn tokio_mpsc_run(publishers: usize) -> Duration {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let reader = tokio::spawn(async move {
        for _ in 0..N {
            rx.recv().await.expect("message");
        }
    });
    let start = Instant::now();
    let writers: Vec<_> = (0..publishers)
        .map(|i| {
            let tx = tx.clone();
            tokio::spawn(async move {
                let body = payload();
                for _ in 0..share(publishers, i) {
                    tx.send(body.clone()).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    reader.await.unwrap();
    start.elapsed()
}

/// `publishers` tasks -> one receiver task over `flume::bounded(1024)`, async on both ends.
async fn flume_run(publishers: usize) -> Duration {
    let (tx, rx) = flume::bounded::<Bytes>(1024);
    let reader = tokio::spawn(async move {
        for _ in 0..N {
            rx.recv_async().await.expect("message");
        }
    });
    let start = Instant::now();
    let writers: Vec<_> = (0..publishers)
        .map(|i| {
            let tx = tx.clone();
            tokio::spawn(async move {
                let body = payload();
                for _ in 0..share(publishers, i) {
                    tx.send_async(body.clone()).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    reader.await.unwrap();
    start.elapsed()
}

/// `publishers` OS threads -> one consumer OS thread over crossbeam `bounded(1024)`.
fn crossbeam_run(publishers: usize) -> Duration {
    let (tx, rx) = crossbeam_channel::bounded::<Bytes>(1024);
    let start = Instant::now();
    let writers: Vec<_> = (0..publishers)
        .map(|i| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let body = payload();
                for _ in 0..share(publishers, i) {
                    tx.send(body.clone()).unwrap();
                }
            })
        })
        .collect();
    for _ in 0..N {
        rx.recv().unwrap();
    }
    for w in writers {
        w.join().unwrap();
    }
    start.elapsed()
}

/// Benches `run` as `name`, summing its own timings over criterion's iterations.
fn timed(
    g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    mut run: impl FnMut() -> Duration,
) {
    g.bench_function(name, |b| {
        b.iter_custom(|iters| (0..iters).map(|_| run()).sum())
    });
}

fn on<F: Future<Output = Duration>>(rt: &tokio::runtime::Runtime, f: F) -> Duration {
    rt.block_on(f)
}

/// One or seven publishers into one subscriber.
fn into_one(c: &mut Criterion, group: &str, publishers: usize) {
    let rt = runtime();
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(N));
    g.sample_size(20);
    timed(&mut g, "crossbeam_threads", || crossbeam_run(publishers));
    timed(&mut g, "tokio_mpsc", || on(&rt, tokio_mpsc_run(publishers)));
    timed(&mut g, "flume", || on(&rt, flume_run(publishers)));
    timed(&mut g, "memorybus", || {
        on(&rt, memorybus_run(publishers, 1, 1024))
    });
    g.finish();
}

fn spsc(c: &mut Criterion) {
    into_one(c, "spsc_64B", 1);
}

fn fanin(c: &mut Criterion) {
    into_one(c, "fanin7_64B", WIDE);
}

fn fanout(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("fanout7_64B");
    // Messages published; each reaches seven subscribers.
    g.throughput(Throughput::Elements(N));
    g.sample_size(10);
    timed(&mut g, "tokio_broadcast", || {
        on(&rt, async {
            // Capacity N: no receiver ever lags, so every receiver gets every message.
            let (tx, _) = tokio::sync::broadcast::channel::<Bytes>(N as usize);
            let readers: Vec<_> = (0..WIDE)
                .map(|_| {
                    let mut rx = tx.subscribe();
                    tokio::spawn(async move {
                        for _ in 0..N {
                            rx.recv().await.unwrap();
                        }
                    })
                })
                .collect();
            let start = Instant::now();
            tokio::spawn(async move {
                let body = payload();
                for _ in 0..N {
                    tx.send(body.clone()).unwrap();
                    // Publishing is async on the bus; give the baseline the same
                    // cooperative yield points a publish through the bus has.
                    tokio::task::consume_budget().await;
                }
            })
            .await
            .unwrap();
            for r in readers {
                r.await.unwrap();
            }
            start.elapsed()
        })
    });
    timed(&mut g, "memorybus", || {
        on(&rt, memorybus_run(1, WIDE, N as usize))
    });
    g.finish();
}

criterion_group!(benches, spsc, fanin, fanout);
criterion_main!(benches);
