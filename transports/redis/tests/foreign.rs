//! A mixed fleet on one redis-server started per test: a Python engine on redis-py
//! (`testkit/python/nautilus_redis.py`, written the way the "nautilus" platform's client
//! works) and busway engines with that platform's `layout`, both ways.

mod common;

use std::time::Duration;

use busway::{Bus, Message, Mode, StartFrom, SubscribeOptions};
use busway_redis::{LayoutOptions, RedisBus, StreamMapping};
use busway_testkit::python::{lines_of, Python};
use busway_testkit::redis::RedisServer;

use common::{connect, next, pat, topic};

fn nautilus() -> LayoutOptions {
    let mut l = LayoutOptions::new(vec![StreamMapping::new(
        "engine.{engine}.{message_type}",
        "nautilus-{engine}-streams",
    )]);
    l.timestamp = Some("timestamp".into());
    l.headers.insert("source".into(), "source_engine".into());
    l.headers
        .insert("correlation_id".into(), "correlation_id".into());
    l
}

async fn bus(url: &str) -> RedisBus {
    connect("platform", url, Mode::Stream, |c| {
        c.read_block = Duration::from_millis(200);
        c.layout = Some(nautilus());
        c.consumer = Some("{app}-consumer-1".into());
    })
    .await
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[tokio::test]
async fn redis_py_entries_reach_a_busway_group_with_topic_headers_and_payload() {
    let Some(python) = Python::find("foreign_redis_py_to_busway") else {
        return;
    };
    let Some(server) = RedisServer::start("foreign_redis_py_to_busway") else {
        return;
    };
    let bus = bus(&server.url()).await;
    let mut sub = bus
        .subscribe(
            pat("engine.portfolio.>"),
            SubscribeOptions::new()
                .group("portfolio-group")
                .start(StartFrom::Beginning),
        )
        .await
        .unwrap();
    let port = server.port().to_string();
    let out = python.spawn(
        "nautilus_redis.py",
        &[
            "produce",
            "--port",
            &port,
            "--key",
            "nautilus-portfolio-streams",
            "--type",
            "order_fill",
            "--count",
            "50",
        ],
    );
    lines_of("produce", &out.finish(Duration::from_secs(60)).await);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    for seq in 0..50 {
        let d = next(&mut sub).await;
        let m = d.message();
        assert_eq!(m.topic.as_str(), "engine.portfolio.order_fill");
        assert_eq!(json(std::str::from_utf8(&m.payload).unwrap())["seq"], seq);
        assert_eq!(m.headers.source.as_deref(), Some("legacy"));
        assert_eq!(
            m.headers.correlation_id.as_deref(),
            Some(format!("corr-{seq}").as_str())
        );
        assert_eq!(m.headers.get("source_instance"), Some("1"));
        assert_eq!(m.headers.get("priority"), Some("normal"));
        // time.time() of a moment ago, in microseconds.
        let ts = m.headers.timestamp_us.expect("timestamp");
        assert!(
            ts <= before && before - ts < 120_000_000,
            "{ts} vs {before}"
        );
        d.ack().await.unwrap();
    }
    let pending = server.cli(&["XPENDING", "nautilus-portfolio-streams", "portfolio-group"]);
    assert_eq!(pending.lines().next(), Some("0"), "{pending}");
    assert_eq!(bus.stats().decode_errors, 0);
}

#[tokio::test]
async fn busway_entries_reach_a_redis_py_consumer_group_in_the_platform_layout() {
    let Some(python) = Python::find("foreign_busway_to_redis_py") else {
        return;
    };
    let Some(server) = RedisServer::start("foreign_busway_to_redis_py") else {
        return;
    };
    let bus = bus(&server.url()).await;
    for seq in 0..50 {
        let mut m = Message::new(
            topic("engine.risk.limit_breach"),
            format!("{{\"seq\":{seq}}}").into_bytes(),
        )
        .with_header("priority", "high")
        .with_header("source_instance", "7")
        .stamped();
        m.headers.source = Some("portfolio".into());
        m.headers.correlation_id = Some(format!("c-{seq}"));
        bus.publish(m).await.unwrap();
    }
    let port = server.port().to_string();
    let out = python
        .spawn(
            "nautilus_redis.py",
            &[
                "consume",
                "--port",
                &port,
                "--key",
                "nautilus-risk-streams",
                "--group",
                "risk-group",
                "--consumer",
                "risk-consumer-1",
                "--count",
                "50",
            ],
        )
        .finish(Duration::from_secs(60))
        .await;
    let lines = lines_of("consume", &out);
    assert_eq!(lines.len(), 50);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for (seq, line) in lines.iter().enumerate() {
        let e = json(line);
        assert_eq!(e["message_type"], "limit_breach", "{line}");
        assert_eq!(e["source_engine"], "portfolio", "{line}");
        assert_eq!(e["source_instance"], "7", "{line}");
        assert_eq!(e["priority"], "high", "{line}");
        assert_eq!(e["correlation_id"], format!("c-{seq}"), "{line}");
        assert_eq!(json(e["payload"].as_str().unwrap())["seq"], seq, "{line}");
        let ts: f64 = e["timestamp"].as_str().unwrap().parse().unwrap();
        assert!(ts <= now && now - ts < 120.0, "{line}");
    }
    let pending = server.cli(&["XPENDING", "nautilus-risk-streams", "risk-group"]);
    assert_eq!(pending.lines().next(), Some("0"), "{pending}");
}
