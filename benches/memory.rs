//! MemoryBus throughput beside the raw channels it competes with, in the same run:
//! one publisher -> one subscriber vs a crossbeam bounded(1024) SPSC transfer, and one
//! publisher -> seven subscribers vs `tokio::sync::broadcast` with seven receivers.
//! 64-byte payloads throughout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use busway::{Bus, MemoryBus, Message, Overflow, Pattern, SubscribeOptions, Topic};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const N: u64 = 50_000;

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

/// Publishes N messages on one MemoryBus to `subs` subscribers and waits until every
/// subscriber has all of them.
async fn memorybus_run(subs: usize, capacity: usize) -> Duration {
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
    let body = payload();
    let start = Instant::now();
    for _ in 0..N {
        bus.publish(Message::new(topic.clone(), body.clone()))
            .await
            .unwrap();
    }
    for r in readers {
        r.await.unwrap();
    }
    let took = start.elapsed();
    bus.close().await.unwrap();
    took
}

fn spsc(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("spsc_64B");
    g.throughput(Throughput::Elements(N));
    g.sample_size(20);
    g.bench_function("crossbeam_bounded_1024", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (tx, rx) = crossbeam_channel::bounded::<Bytes>(1024);
                let body = payload();
                let start = Instant::now();
                let producer = std::thread::spawn(move || {
                    for _ in 0..N {
                        tx.send(body.clone()).unwrap();
                    }
                });
                for _ in 0..N {
                    rx.recv().unwrap();
                }
                producer.join().unwrap();
                total += start.elapsed();
            }
            total
        })
    });
    g.bench_function("memorybus_1024", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(memorybus_run(1, 1024));
            }
            total
        })
    });
    g.finish();
}

fn fanout(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("fanout7_64B");
    // Messages published; each reaches seven subscribers.
    g.throughput(Throughput::Elements(N));
    g.sample_size(10);
    g.bench_function("tokio_broadcast", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(async {
                    // Capacity N: no receiver ever lags, so every receiver gets every message.
                    let (tx, _) = tokio::sync::broadcast::channel::<Bytes>(N as usize);
                    let readers: Vec<_> = (0..7)
                        .map(|_| {
                            let mut rx = tx.subscribe();
                            tokio::spawn(async move {
                                for _ in 0..N {
                                    rx.recv().await.unwrap();
                                }
                            })
                        })
                        .collect();
                    let body = payload();
                    let start = Instant::now();
                    for _ in 0..N {
                        tx.send(body.clone()).unwrap();
                        // Publishing is async on the bus; give the baseline the same
                        // cooperative yield points a publish through the bus has.
                        tokio::task::consume_budget().await;
                    }
                    for r in readers {
                        r.await.unwrap();
                    }
                    start.elapsed()
                });
            }
            total
        })
    });
    g.bench_function("memorybus", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(memorybus_run(7, N as usize));
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, spsc, fanout);
criterion_main!(benches);
