//! The broadcast frame codec beside the obvious alternative: the same message as JSON
//! (serde_json of busway's `Headers` plus the payload), 64-byte payload, with and without
//! headers.

use busway::{Headers, Message, Topic};
use busway_redis::wire;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};

fn messages() -> Vec<(&'static str, Message)> {
    let topic = Topic::new("marketdata.quotes.AAPL").unwrap();
    let bare = Message::new(topic.clone(), vec![7u8; 64]);
    let full = Message::new(topic, vec![7u8; 64])
        .with_id("0123456789abcdef0123456789abcdef")
        .with_content_type("application/json")
        .with_header("venue", "XNAS")
        .stamped();
    vec![("no_headers", bare), ("id_ts_ct_extra", full)]
}

#[derive(serde::Serialize, serde::Deserialize)]
struct JsonFrame {
    headers: Headers,
    payload: Vec<u8>,
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_64B");
    for (name, m) in messages() {
        let encoded = Bytes::from(wire::encode(&m));
        g.bench_function(format!("busway_encode/{name}"), |b| {
            b.iter(|| wire::encode(std::hint::black_box(&m)))
        });
        g.bench_function(format!("busway_decode/{name}"), |b| {
            b.iter(|| wire::decode(m.topic.clone(), std::hint::black_box(encoded.clone())).unwrap())
        });
        let json = serde_json::to_vec(&JsonFrame {
            headers: m.headers.clone(),
            payload: m.payload.to_vec(),
        })
        .unwrap();
        g.bench_function(format!("json_encode/{name}"), |b| {
            b.iter(|| {
                serde_json::to_vec(&JsonFrame {
                    headers: std::hint::black_box(&m).headers.clone(),
                    payload: m.payload.to_vec(),
                })
                .unwrap()
            })
        });
        g.bench_function(format!("json_decode/{name}"), |b| {
            b.iter(|| serde_json::from_slice::<JsonFrame>(std::hint::black_box(&json)).unwrap())
        });
    }
    g.finish();
}

fn topics(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    g.bench_function("topic/marketdata.quotes.AAPL", |b| {
        b.iter(|| Topic::new(std::hint::black_box("marketdata.quotes.AAPL")).unwrap())
    });
    g.bench_function("pattern/marketdata.*.AAPL", |b| {
        b.iter(|| busway::Pattern::new(std::hint::black_box("marketdata.*.AAPL")).unwrap())
    });
    g.finish();
}

criterion_group!(benches, codec, topics);
criterion_main!(benches);
