//! Stream layouts busway did not create (`layout`, `consumer`), against a real redis-server
//! started per test: entries XADDed by `redis-cli` the way the platform's own client writes
//! them are read, and busway's entries are written in that layout.

mod common;

use std::time::Duration;

use busway::{Bus, ErrorKind, Message, Mode, StartFrom, SubscribeOptions, Subscription};
use busway_redis::{LayoutOptions, RedisBus, RedisConfig, StreamMapping};
use busway_testkit::redis::RedisServer;

use common::{assert_refused, connect, next, pat, topic};

/// The platform's layout: shared traffic keys and one key per engine.
fn nautilus() -> LayoutOptions {
    let mut l = LayoutOptions::new(vec![
        StreamMapping::new("marketdata.{message_type}", "nautilus-marketdata-streams"),
        StreamMapping::new("trade.{message_type}", "nautilus-trade-streams"),
        StreamMapping::new(
            "engine.{engine}.{message_type}",
            "nautilus-{engine}-streams",
        ),
    ]);
    l.timestamp = Some("timestamp".into());
    l.headers.insert("source".into(), "source_engine".into());
    l.headers
        .insert("correlation_id".into(), "correlation_id".into());
    l
}

async fn bus(url: &str, f: impl FnOnce(&mut RedisConfig)) -> RedisBus {
    connect("platform", url, Mode::Stream, |c| {
        c.read_block = Duration::from_millis(200);
        c.rescan_interval = Duration::from_millis(200);
        c.layout = Some(nautilus());
        c.consumer = Some("{app}-consumer-1".into());
        f(c)
    })
    .await
}

async fn nothing(sub: &mut Subscription) {
    if let Ok(Some(d)) = sub.recv_timeout(Duration::from_millis(700)).await {
        panic!("unexpected delivery {d:?}");
    }
}

/// `XADD key MAXLEN ~ 100000 * <the platform client's fields>`, as its Python client does.
fn foreign_xadd(server: &RedisServer, key: &str, message_type: &str, payload: &str) -> String {
    server
        .cli(&[
            "XADD",
            key,
            "MAXLEN",
            "~",
            "100000",
            "*",
            "message_type",
            message_type,
            "source_engine",
            "collateral",
            "source_instance",
            "2",
            "payload",
            payload,
            "priority",
            "high",
            "timestamp",
            "1733353681.25",
            "correlation_id",
            "c-7",
        ])
        .trim()
        .to_string()
}

#[tokio::test]
async fn foreign_entries_are_read_with_topic_headers_and_payload_then_acked() {
    let Some(server) = RedisServer::start("layout_read") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let mut sub = bus
        .subscribe(
            pat("engine.portfolio.>"),
            SubscribeOptions::new()
                .group("portfolio-group")
                .start(StartFrom::Beginning),
        )
        .await
        .unwrap();
    foreign_xadd(
        &server,
        "nautilus-portfolio-streams",
        "order_fill",
        "{\"qty\":3}",
    );
    let d = next(&mut sub).await;
    let m = d.message();
    assert_eq!(m.topic.as_str(), "engine.portfolio.order_fill");
    assert_eq!(&m.payload[..], b"{\"qty\":3}");
    assert_eq!(m.headers.source.as_deref(), Some("collateral"));
    assert_eq!(m.headers.correlation_id.as_deref(), Some("c-7"));
    assert_eq!(m.headers.timestamp_us, Some(1_733_353_681_250_000));
    assert_eq!(m.headers.get("source_instance"), Some("2"));
    assert_eq!(m.headers.get("priority"), Some("high"));
    assert_eq!(m.headers.get("message_type"), None, "it is in the topic");
    // Read by the platform's group, under the platform's consumer name, and acked there.
    let consumers = server.cli(&[
        "XINFO",
        "CONSUMERS",
        "nautilus-portfolio-streams",
        "portfolio-group",
    ]);
    assert!(consumers.contains("test-consumer-1"), "{consumers}");
    let pending = server.cli(&["XPENDING", "nautilus-portfolio-streams", "portfolio-group"]);
    assert_eq!(pending.lines().next(), Some("1"), "{pending}");
    d.ack().await.unwrap();
    let pending = server.cli(&["XPENDING", "nautilus-portfolio-streams", "portfolio-group"]);
    assert_eq!(pending.lines().next(), Some("0"), "{pending}");
    // Nothing of busway's own: no index, no busway:stream: keys.
    assert_eq!(server.cli(&["KEYS", "busway:*"]).trim(), "");
}

#[tokio::test]
async fn busway_writes_the_layout_with_maxlen() {
    let Some(server) = RedisServer::start("layout_write") else {
        return;
    };
    let bus = bus(&server.url(), |c| c.stream_maxlen = 100).await;
    let m = Message::new(topic("marketdata.quote"), &b"{\"px\":1}"[..])
        .with_id("m1")
        .with_header("priority", "low")
        .stamped();
    let us = m.headers.timestamp_us.unwrap();
    let mut m2 = m.clone();
    m2.headers.source = Some("pricing".into());
    m2.headers.correlation_id = Some("c-1".into());
    bus.publish(m2).await.unwrap();
    let entry = server.cli(&["XRANGE", "nautilus-marketdata-streams", "-", "+"]);
    let lines: Vec<&str> = entry.lines().collect();
    // id, then field/value pairs.
    let fields: Vec<(&str, &str)> = lines[1..].chunks(2).map(|p| (p[0], p[1])).collect();
    let want_ts = format!("{}.{:06}", us / 1_000_000, us % 1_000_000);
    assert_eq!(
        fields,
        [
            ("payload", "{\"px\":1}"),
            ("message_type", "quote"),
            ("timestamp", want_ts.as_str()),
            ("id", "m1"),
            ("source_engine", "pricing"),
            ("correlation_id", "c-1"),
            ("priority", "low"),
        ]
    );
    for i in 0..1000u32 {
        bus.publish(Message::new(
            topic("marketdata.tick"),
            i.to_be_bytes().to_vec(),
        ))
        .await
        .unwrap();
    }
    let len: u64 = server
        .cli(&["XLEN", "nautilus-marketdata-streams"])
        .trim()
        .parse()
        .unwrap();
    assert!(len < 1000, "MAXLEN ~ 100 trims: {len}");
    let err = bus
        .publish(Message::new(topic("marketdata"), &b"x"[..]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTopic, "{err}");
    assert!(
        err.to_string().contains("\"platform\"") && err.to_string().contains("\"marketdata\""),
        "{err}"
    );
    assert_eq!(server.cli(&["KEYS", "busway:*"]).trim(), "");
}

#[tokio::test]
async fn each_subscription_gets_its_topics_of_a_shared_key() {
    let Some(server) = RedisServer::start("layout_shared_key") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let opts = || SubscribeOptions::new().start(StartFrom::Beginning);
    let mut quotes = bus
        .subscribe(pat("marketdata.quote"), opts())
        .await
        .unwrap();
    let mut all = bus.subscribe(pat("marketdata.*"), opts()).await.unwrap();
    let mut grouped = bus
        .subscribe(pat("marketdata.quote"), opts().group("risk-group"))
        .await
        .unwrap();
    foreign_xadd(&server, "nautilus-marketdata-streams", "trade", "t1");
    foreign_xadd(&server, "nautilus-marketdata-streams", "quote", "q1");
    let d = next(&mut quotes).await;
    assert_eq!(d.message().topic.as_str(), "marketdata.quote");
    d.ack().await.unwrap();
    for want in ["marketdata.trade", "marketdata.quote"] {
        let d = next(&mut all).await;
        assert_eq!(d.message().topic.as_str(), want);
        d.ack().await.unwrap();
    }
    // The group read both entries: the quote went to its subscription, the trade (no
    // subscription of the group wants it) was acked and counted as dropped.
    let d = next(&mut grouped).await;
    assert_eq!(&d.message().payload[..], b"q1");
    d.ack().await.unwrap();
    nothing(&mut quotes).await;
    nothing(&mut grouped).await;
    let pending = server.cli(&["XPENDING", "nautilus-marketdata-streams", "risk-group"]);
    assert_eq!(pending.lines().next(), Some("0"), "{pending}");
    assert_eq!(bus.stats().dropped, 1);
}

#[tokio::test]
async fn entries_without_a_topic_are_counted_and_acked_and_patterns_without_a_key_refused() {
    let Some(server) = RedisServer::start("layout_bad_entries") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let mut sub = bus
        .subscribe(
            pat("trade.>"),
            SubscribeOptions::new()
                .group("g")
                .start(StartFrom::Beginning),
        )
        .await
        .unwrap();
    // No message_type field: no topic. A message_type that is no topic token: no topic.
    server.cli(&["XADD", "nautilus-trade-streams", "*", "payload", "x"]);
    foreign_xadd(&server, "nautilus-trade-streams", "a b", "y");
    foreign_xadd(&server, "nautilus-trade-streams", "fill", "z");
    let d = next(&mut sub).await;
    assert_eq!(d.message().topic.as_str(), "trade.fill");
    d.ack().await.unwrap();
    assert_eq!(bus.stats().decode_errors, 2);
    let pending = server.cli(&["XPENDING", "nautilus-trade-streams", "g"]);
    assert_eq!(pending.lines().next(), Some("0"), "{pending}");
    let err = bus
        .subscribe(pat("engine.*.fill"), SubscribeOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string().contains("\"platform\"") && err.to_string().contains("{engine}"),
        "{err}"
    );
    let err = bus
        .subscribe(pat("other.>"), SubscribeOptions::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("matches no topic"), "{err}");
}

#[tokio::test]
async fn bad_layouts_are_refused_by_validate_and_build() {
    let base = "url = \"redis://u:pw@127.0.0.1:1\"\nmode = \"stream\"\n";
    assert_refused(
        &format!("{base}[buses.main.layout]\nstreams = []\n"),
        "cfg.toml: buses.main.layout: streams is empty",
    )
    .await;
    assert_refused(
        &format!("{base}[[buses.main.layout.streams]]\ntopic = \"md.{{type\"\nkey = \"k\"\n"),
        "cfg.toml: buses.main.layout: streams[0].topic \"md.{type\"",
    )
    .await;
    assert_refused(
        &format!("{base}[[buses.main.layout.streams]]\ntopic = \"md.{{type}}\"\nkey = \"k-{{engine}}\"\n"),
        "cfg.toml: buses.main.layout: streams[0].key \"k-{engine}\" {engine} is not a {field} of the topic template",
    )
    .await;
    assert_refused(
        "url = \"redis://u:pw@127.0.0.1:1\"\n[[buses.main.layout.streams]]\ntopic = \"md.{t}\"\nkey = \"k\"\n",
        "cfg.toml: buses.main.layout: applies to stream mode",
    )
    .await;
    assert_refused(
        &format!("{base}dead_letter = \"dead\"\nmax_deliveries = 2\n[[buses.main.layout.streams]]\ntopic = \"md.{{t}}\"\nkey = \"k\"\n"),
        "cfg.toml: buses.main.dead_letter: topic \"dead\" falls in no layout.streams topic",
    )
    .await;
    assert_refused(
        &format!("{base}key_prefix = \"x:\"\n[[buses.main.layout.streams]]\ntopic = \"md.{{t}}\"\nkey = \"k\"\n"),
        "cfg.toml: buses.main.key_prefix: does not apply with a layout",
    )
    .await;
    assert_refused(
        &format!("{base}consumer = \"{{engine}}-consumer-1\"\n"),
        "cfg.toml: buses.main.consumer: \"{engine}-consumer-1\": {engine} is not one of",
    )
    .await;
}

/// The `lang` code blocks of docs/WIRE.md, in order.
fn wire_blocks(lang: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/WIRE.md"))
        .expect("docs/WIRE.md");
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim_end()) {
            (None, l) if l == format!("```{lang}") => current = Some(String::new()),
            (Some(_), "```") => out.extend(current.take()),
            (Some(text), l) => {
                text.push_str(l);
                text.push('\n');
            }
            _ => {}
        }
    }
    out
}

/// `name: value` lines.
fn pairs(block: &str) -> Vec<(String, String)> {
    block
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(": ").expect("name: value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[tokio::test]
async fn the_documented_nautilus_example_is_read_and_written_as_documented() {
    let Some(server) = RedisServer::start("layout_wire_doc") else {
        return;
    };
    let [toml] = &wire_blocks("toml layout-example")[..] else {
        panic!("one layout-example block in docs/WIRE.md");
    };
    let [entry] = &wire_blocks("layout-entry")[..] else {
        panic!("one layout-entry block");
    };
    let [message] = &wire_blocks("layout-message")[..] else {
        panic!("one layout-message block");
    };
    let (entry, want) = (pairs(entry), pairs(message));
    let get = |k: &str| {
        want.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{k} in layout-message"))
    };
    let mut config = busway::Config::from_toml(toml, "WIRE.md").unwrap();
    config.buses.get_mut("platform").unwrap().url = Some(server.url());
    let mut registry = busway::Registry::new();
    busway_redis::register(&mut registry);
    let bus = registry.build(&config, "platform").await.unwrap();

    let mut sub = bus
        .subscribe(
            pat(get("topic")),
            SubscribeOptions::new()
                .group("portfolio-group")
                .start(StartFrom::Beginning),
        )
        .await
        .unwrap();
    let mut xadd = vec!["XADD", get("key"), "MAXLEN", "~", "100000", "*"];
    for (k, v) in &entry {
        xadd.extend([k.as_str(), v.as_str()]);
    }
    server.cli(&xadd);
    let d = next(&mut sub).await;
    let m = d.message();
    assert_eq!(m.topic.as_str(), get("topic"));
    assert_eq!(&m.payload[..], get("payload").as_bytes());
    assert_eq!(
        m.headers.timestamp_us,
        Some(get("timestamp_us").parse().unwrap())
    );
    assert_eq!(m.headers.source.as_deref(), Some(get("source")));
    assert_eq!(
        m.headers.correlation_id.as_deref(),
        Some(get("correlation_id"))
    );
    let free: Vec<(String, String)> = want
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("h.")?.to_string(), v.clone())))
        .collect();
    assert_eq!(m.headers.extra, free);
    let consumers = server.cli(&["XINFO", "CONSUMERS", get("key"), "portfolio-group"]);
    assert!(consumers.contains("portfolio-consumer-1"), "{consumers}");
    d.ack().await.unwrap();
    let pending = server.cli(&["XPENDING", get("key"), "portfolio-group"]);
    assert_eq!(pending.lines().next(), Some("0"), "{pending}");

    // Written back: the same fields, in the documented order (no id: the message has none).
    let mut again = m.clone();
    server.cli(&["DEL", get("key")]);
    again.headers.id = None;
    bus.publish(again).await.unwrap();
    let written = server.cli(&["XRANGE", get("key"), "-", "+"]);
    let lines: Vec<&str> = written.lines().skip(1).collect();
    let mut written: Vec<(String, String)> = lines
        .chunks(2)
        .map(|p| (p[0].to_string(), p[1].to_string()))
        .collect();
    let mut entry = entry;
    written.sort();
    entry.sort();
    assert_eq!(written, entry);
}

#[tokio::test]
async fn the_consumer_instance_comes_from_busway_instance() {
    let body = "url = \"redis://127.0.0.1:1\"\nmode = \"stream\"\nconsumer = \"{app}-consumer-{instance}\"\n";
    std::env::remove_var("BUSWAY_INSTANCE");
    assert_refused(
        body,
        "cfg.toml: buses.main.consumer: \"{app}-consumer-{instance}\" uses {instance}, but BUSWAY_INSTANCE is not set",
    )
    .await;
    let Some(server) = RedisServer::start("layout_instance") else {
        return;
    };
    // This test's process only (nextest runs each test in a process of its own).
    std::env::set_var("BUSWAY_INSTANCE", "3");
    let bus = bus(&server.url(), |c| {
        c.consumer = Some("{app}-consumer-{instance}".into())
    })
    .await;
    let mut sub = bus
        .subscribe(pat("trade.fill"), SubscribeOptions::new().group("g"))
        .await
        .unwrap();
    foreign_xadd(&server, "nautilus-trade-streams", "fill", "x");
    next(&mut sub).await.ack().await.unwrap();
    let consumers = server.cli(&["XINFO", "CONSUMERS", "nautilus-trade-streams", "g"]);
    assert!(consumers.contains("test-consumer-3"), "{consumers}");
}
