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

/// The platform bus as an engine's config has it: the nautilus layout on `url`.
fn platform_toml(url: &str) -> String {
    format!(
        r#"
[buses.platform]
transport = "redis"
url = "{url}"
mode = "stream"
read_block = "100ms"
consumer = "{{app}}-consumer-1"

[buses.platform.layout]
timestamp = "timestamp"
headers = {{ source = "source_engine", correlation_id = "correlation_id" }}

[[buses.platform.layout.streams]]
topic = "engine.{{engine}}.{{message_type}}"
key = "nautilus-{{engine}}-streams"
"#
    )
}

/// The new engine bus (busway's own stream layout) on `url`.
fn engine_toml(url: &str) -> String {
    format!(
        "\n[buses.engine]\ntransport = \"redis\"\nurl = \"{url}\"\nmode = \"stream\"\nread_block = \"100ms\"\n"
    )
}

async fn router(app: &str, buses: &str, routes: &str) -> (busway::Router, busway::Config) {
    let text = format!(
        "[app]\nname = \"{app}\"\n[router]\ndedup_window = 10000\ndrain_grace = \"1s\"\n{buses}\n{routes}\n"
    );
    let config = busway::Config::from_toml(&text, &format!("{app}.toml")).unwrap();
    let router = busway::Router::from_config(&config, &registry())
        .await
        .unwrap();
    (router, config)
}

fn registry() -> busway::Registry {
    let mut r = busway::Registry::new();
    busway_redis::register(&mut r);
    r
}

/// The `seq` of a payload `{"seq": n}`.
fn seq_of(m: &Message) -> u64 {
    json(std::str::from_utf8(&m.payload).unwrap())["seq"]
        .as_u64()
        .unwrap()
}

/// Asserts `got` holds each of `0..n` exactly once.
fn exactly_once(who: &str, got: &[u64], n: u64) {
    let mut sorted = got.to_vec();
    sorted.sort_unstable();
    let dup_seqs: Vec<u64> = sorted
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    let dups = dup_seqs.len();
    sorted.dedup();
    let lost: Vec<u64> = (0..n)
        .filter(|s| sorted.binary_search(s).is_err())
        .collect();
    assert!(
        lost.is_empty() && dups == 0 && got.len() as u64 == n,
        "{who}: {} received, {} lost (first {:?}), {dups} duplicated {dup_seqs:?}",
        got.len(),
        lost.len(),
        lost.iter().take(10).collect::<Vec<_>>()
    );
}

/// One engine moved from the Python side to busway under traffic: the portfolio engine
/// (the producer) is a Python process writing the platform layout, then a busway engine
/// mirroring onto a new engine bus; the collateral engine (busway) moves its reading to the
/// engine bus with a reload meanwhile; the risk engine (Python) keeps reading the platform
/// layout throughout. Each consumer gets every message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_moves_from_python_to_busway_under_traffic_without_loss_or_duplicates() {
    const PYTHON_SENDS: u64 = 150;
    const TOTAL: u64 = 400;
    let Some(python) = Python::find("foreign_migration") else {
        return;
    };
    let (Some(shared), Some(new)) = (
        RedisServer::start("foreign_migration_shared"),
        RedisServer::start("foreign_migration_engine"),
    ) else {
        return;
    };
    let key = "nautilus-collateral-streams";
    let platform = platform_toml(&shared.url());
    let to_platform =
        "[[routes]]\nmatch = \"engine.>\"\nto = \"platform\"\n[default]\nto = \"platform\"";

    // The collateral engine on busway, reading the platform layout in its group.
    let (collateral, _) = router("collateral", &platform, to_platform).await;
    let collateral = std::sync::Arc::new(collateral);
    let sub = collateral
        .subscribe(
            pat("engine.collateral.>"),
            SubscribeOptions::new()
                .group("collateral-group")
                .start(StartFrom::Beginning),
        )
        .await
        .unwrap();
    let got = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = {
        let (got, stop) = (got.clone(), stop.clone());
        let mut sub = sub;
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(Some(d)) = sub.recv_timeout(Duration::from_millis(100)).await {
                    got.lock().push(seq_of(d.message()));
                    d.ack().await.unwrap();
                }
            }
            sub
        })
    };
    // The risk engine, still on Python, reading the same key in its own group throughout.
    let port = shared.port().to_string();
    let total = TOTAL.to_string();
    let risk = python.spawn(
        "nautilus_redis.py",
        &[
            "consume",
            "--port",
            &port,
            "--key",
            key,
            "--group",
            "risk-group",
            "--consumer",
            "risk-consumer-1",
            "--count",
            &total,
            "--timeout",
            "120",
        ],
    );

    // Phase 1: the portfolio engine is the Python one.
    let sends = PYTHON_SENDS.to_string();
    let producer = python.spawn(
        "nautilus_redis.py",
        &[
            "produce",
            "--port",
            &port,
            "--key",
            key,
            "--type",
            "position_update",
            "--count",
            &sends,
            "--interval",
            "0.002",
        ],
    );
    lines_of(
        "python producer",
        &producer.finish(Duration::from_secs(60)).await,
    );

    // Phase 2: the portfolio engine on busway, mirroring engine topics onto the new bus and
    // the platform layout (where the Python risk engine reads).
    let mirror = "[[routes]]\nmatch = \"engine.>\"\nto = [\"engine\", \"platform\"]\n[default]\nto = \"platform\"";
    let (portfolio, _) = router(
        "portfolio",
        &format!("{platform}{}", engine_toml(&new.url())),
        mirror,
    )
    .await;
    let publisher = tokio::spawn(async move {
        for seq in PYTHON_SENDS..TOTAL {
            let m = Message::new(
                topic("engine.collateral.position_update"),
                format!("{{\"seq\":{seq}}}").into_bytes(),
            );
            portfolio.publish(m).await.unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        portfolio
    });

    // Meanwhile the collateral engine moves its reading to the engine bus.
    let start = std::time::Instant::now();
    while (got.lock().len() as u64) < PYTHON_SENDS + 60 {
        assert!(start.elapsed() < Duration::from_secs(60), "no traffic");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let to_engine =
        "[[routes]]\nmatch = \"engine.>\"\nto = \"engine\"\n[default]\nto = \"platform\"";
    let text = format!(
        "[app]\nname = \"collateral\"\n[router]\ndedup_window = 10000\ndrain_grace = \"1s\"\n{platform}{}\n{to_engine}\n",
        engine_toml(&new.url())
    );
    let after = busway::Config::from_toml(&text, "collateral.toml").unwrap();
    let report = collateral.reload(&after, &registry()).await.unwrap();
    assert_eq!((report.subscriptions, report.moved), (1, 1), "{report}");
    assert_eq!(report.added, ["engine"], "{report}");

    let portfolio = publisher.await.unwrap();
    let start = std::time::Instant::now();
    while (got.lock().len() as u64) < TOTAL && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A copy that came late would show up now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sub = receiver.await.unwrap();
    exactly_once("collateral (busway, moved by reload)", &got.lock(), TOTAL);
    // It heard both buses for a while: the mirror's copies were dropped by message id.
    let stats = sub.stats();
    assert!(stats.duplicates > 0, "{stats}");
    assert_eq!(stats.delivered, TOTAL, "{stats}");
    let risk = risk.finish(Duration::from_secs(120)).await;
    let seqs: Vec<u64> = lines_of("risk consumer", &risk)
        .iter()
        .map(|l| {
            json(json(l)["payload"].as_str().unwrap())["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    exactly_once("risk (Python, platform layout)", &seqs, TOTAL);
    // The moved engine read the new bus; nothing is left pending in either group.
    let on_new: u64 = new
        .cli(&["XLEN", "busway:stream:engine.collateral.position_update"])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(on_new, TOTAL - PYTHON_SENDS);
    let pending = shared.cli(&["XPENDING", key, "risk-group"]);
    assert_eq!(pending.lines().next(), Some("0"), "risk-group: {pending}");
    let new_key = "busway:stream:engine.collateral.position_update";
    let pending = new.cli(&["XPENDING", new_key, "collateral-group"]);
    assert_eq!(
        pending.lines().next(),
        Some("0"),
        "collateral-group: {pending}"
    );
    portfolio.close().await.unwrap();
}

/// Request/reply both ways on a busway-framed pub/sub bus, the Python side speaking the
/// frame and protocol of docs/WIRE.md (`testkit/python/busway_frame.py`, written from it).
#[tokio::test]
async fn redis_py_and_busway_request_each_other_on_pub_sub_with_headers() {
    let Some(python) = Python::find("foreign_redis_rpc") else {
        return;
    };
    let Some(server) = RedisServer::start("foreign_redis_rpc") else {
        return;
    };
    let bus = connect("rpc", &server.url(), Mode::Broadcast, |_| {}).await;
    let port = server.port().to_string();

    // A Python requester, a busway responder.
    let mut svc = bus
        .subscribe(pat("svc.ping"), SubscribeOptions::new())
        .await
        .unwrap();
    let requester = python.spawn(
        "redis_pubsub.py",
        &[
            "request",
            "--port",
            &port,
            "--channel",
            "svc.ping",
            "--data",
            "ping",
            "--header",
            "desk=fx",
        ],
    );
    let d = next(&mut svc).await;
    assert_eq!(&d.message().payload[..], b"ping");
    assert_eq!(d.message().headers.get("desk"), Some("fx"));
    assert!(d.message().headers.correlation_id.is_some());
    d.reply("pong").await.unwrap();
    let lines = lines_of(
        "requester",
        &requester.finish(Duration::from_secs(30)).await,
    );
    assert_eq!(json(&lines[0])["payload"], "pong", "{lines:?}");

    // A busway requester, a Python responder.
    let responder = python
        .spawn(
            "redis_pubsub.py",
            &[
                "reply",
                "--port",
                &port,
                "--channel",
                "svc.py",
                "--count",
                "1",
            ],
        )
        .ready()
        .await;
    let answer = bus
        .request(
            Message::new(topic("svc.py"), &b"hello"[..]).with_header("desk", "eq"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(&answer.payload[..], b"pong:hello");
    assert_eq!(answer.headers.source.as_deref(), Some("python"));
    assert_eq!(answer.headers.get("desk"), Some("eq"));
    let lines = lines_of(
        "responder",
        &responder.finish(Duration::from_secs(30)).await,
    );
    let request = json(&lines[0]);
    assert_eq!(request["payload"], "hello", "{lines:?}");
    assert_eq!(request["extra"][0], serde_json::json!(["desk", "eq"]));
}
