//! Bytes from a foreign publisher (garbage, truncated, oversized) are counted in
//! `decode_errors` and skipped, the subscription going on; an oversized publish is refused
//! naming the limit. Each test starts its own redis-server.

mod common;

use std::time::Duration;

use busway::{Bus, ErrorKind, Message, Mode, SubscribeOptions};
use busway_redis::{wire, RedisBus};
use busway_testkit::redis::RedisServer;

use common::{connect, pat, topic, WAIT};

const MAX: usize = 16;

async fn bus(url: &str, mode: Mode) -> RedisBus {
    connect("main", url, mode, |c| {
        c.max_payload = MAX;
        c.read_block = Duration::from_millis(200);
        c.rescan_interval = Duration::from_millis(200);
    })
    .await
}

/// A plain redis client: the foreign publisher.
async fn foreign(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn broadcast_skips_garbage_truncated_and_oversized_frames() {
    let Some(server) = RedisServer::start("broadcast_bad_frames") else {
        return;
    };
    let bus = bus(&server.url(), Mode::Broadcast).await;
    let mut sub = bus
        .subscribe(pat("g.*"), SubscribeOptions::new())
        .await
        .unwrap();
    let mut full = Message::new(topic("g.x"), &b"payload"[..]).with_id("an-id");
    full.headers.correlation_id = Some("c".into());
    let good = wire::encode(&full);
    let truncated = good[..good.len() - full.payload.len() - 2].to_vec();
    let oversized = wire::encode(&Message::new(topic("g.x"), vec![7u8; MAX + 1]));
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("text", b"not a busway frame".to_vec()),
        ("empty", Vec::new()),
        ("truncated", truncated),
        ("unknown version", vec![wire::MAGIC, 99, 0]),
        (
            "length past the end",
            vec![wire::MAGIC, wire::VERSION, 0x01, 0x7f, b'a'],
        ),
        (
            "bad reply_to",
            [&[wire::MAGIC, wire::VERSION, 0x10, 9][..], b"bad topic"].concat(),
        ),
        ("oversized", oversized),
    ];
    let mut con = foreign(&server.url()).await;
    for (_, bytes) in &bad {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("g.x")
            .arg(bytes.as_slice())
            .query_async(&mut con)
            .await
            .unwrap();
    }
    // A well-formed foreign frame of the right size still gets through, then ours.
    let _: i64 = redis::cmd("PUBLISH")
        .arg("g.x")
        .arg(good.as_slice())
        .query_async(&mut con)
        .await
        .unwrap();
    bus.publish(Message::new(topic("g.y"), &b"ok"[..]))
        .await
        .unwrap();
    let d = sub.recv_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(d.message(), &full, "the well-formed foreign frame");
    let d = sub.recv_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(&d.message().payload[..], b"ok", "the subscription goes on");
    assert_eq!(
        bus.stats().decode_errors,
        bad.len() as u64,
        "one count per bad frame: {:?}",
        bad.iter().map(|(w, _)| *w).collect::<Vec<_>>()
    );
    assert!(
        sub.recv_timeout(Duration::from_millis(300)).await.is_err(),
        "nothing else is delivered"
    );
}

#[tokio::test]
async fn stream_skips_bad_and_oversized_entries() {
    let Some(server) = RedisServer::start("stream_bad_entries") else {
        return;
    };
    let bus = bus(&server.url(), Mode::Stream).await;
    let mut sub = bus
        .subscribe(pat("s"), SubscribeOptions::new().group("g"))
        .await
        .unwrap();
    let key = "busway:stream:s";
    let big = "x".repeat(MAX + 1);
    server.cli(&["XADD", key, "*", "payload", &big]);
    server.cli(&["XADD", key, "*", "payload", "p", "ts", "notanumber"]);
    server.cli(&["XADD", key, "*", "payload", "p", "reply_to", "bad topic"]);
    server.cli(&["XADD", key, "*", "no_payload", "1"]);
    bus.publish(Message::new(topic("s"), &b"ok"[..]))
        .await
        .unwrap();
    let d = sub.recv_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(&d.message().payload[..], b"ok");
    d.ack().await.unwrap();
    assert_eq!(bus.stats().decode_errors, 4);
    // The bad entries were acked: nothing is pending, nothing comes back.
    let pending = server.cli(&["XPENDING", key, "g"]);
    assert!(pending.starts_with("0\n"), "XPENDING: {pending}");
}

#[tokio::test]
async fn oversized_publish_is_refused_naming_the_limit() {
    let Some(server) = RedisServer::start("oversized_publish") else {
        return;
    };
    for mode in [Mode::Broadcast, Mode::Stream] {
        let bus = bus(&server.url(), mode).await;
        assert_eq!(bus.capabilities().max_payload, MAX);
        bus.publish(Message::new(topic("big"), vec![0u8; MAX]))
            .await
            .expect("exactly max_payload is fine");
        let err = bus
            .publish(Message::new(topic("big"), vec![0u8; MAX + 1]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{mode:?}: {err}");
        let text = err.to_string();
        assert!(
            text.contains("\"main\"")
                && text.contains("\"big\"")
                && text.contains(&format!("{} bytes", MAX + 1))
                && text.contains(&format!("limit of {MAX} bytes")),
            "{mode:?}: {text}"
        );
    }
}

#[tokio::test]
async fn foreign_stream_fields_arrive_as_headers_and_an_entry_without_payload_is_counted() {
    let Some(server) = RedisServer::start("foreign_stream_fields") else {
        return;
    };
    let bus = bus(&server.url(), Mode::Stream).await;
    let mut sub = bus
        .subscribe(pat("t"), SubscribeOptions::new().group("g"))
        .await
        .unwrap();
    let key = "busway:stream:t";
    server.cli(&["XADD", key, "*", "symbol", "MSFT"]);
    server.cli(&["XADD", key, "*", "payload", "one", "symbol", "AAPL"]);
    let d = sub.recv_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(&d.message().payload[..], b"one");
    assert_eq!(d.message().headers.get("symbol"), Some("AAPL"));
    d.ack().await.unwrap();
    assert_eq!(bus.stats().decode_errors, 1, "the entry without a payload");
}

#[tokio::test]
async fn raw_bus_refuses_user_headers_naming_bus_and_header() {
    let Some(server) = RedisServer::start("raw_refuses_headers") else {
        return;
    };
    let bus = connect("legacy", &server.url(), Mode::Broadcast, |c| {
        c.framing = busway_redis::Framing::Raw;
    })
    .await;
    let mut m = Message::new(topic("r"), &b"p"[..]);
    m.headers.insert("symbol", "AAPL");
    let err = bus.publish(m).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("\"legacy\"") && text.contains("\"symbol\""),
        "{text}"
    );
    let mut m = Message::new(topic("r"), &b"p"[..]);
    m.headers.correlation_id = Some("c".into());
    let err = bus.publish(m).await.unwrap_err();
    assert!(err.to_string().contains("correlation_id"), "{err}");
    // busway's own bookkeeping is not a user header: it does not travel and is not refused.
    let m = Message::new(topic("r"), &b"p"[..])
        .with_id("i")
        .with_content_type("text/plain");
    bus.publish(m)
        .await
        .expect("id and content type are not refused");
}
