//! The migration toolkit against real Redis servers: mirror de-duplication across a memory
//! and a Redis bus, reload under load between memory and Redis with exact counts, SIGHUP
//! reload of `busway tail`, and `busway audit`.

mod common;
use common::Spawned;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busway::{Bus, Config, Message, Pattern, Router, SubscribeOptions, Subscription, Topic};
use busway_testkit::redis::RedisServer;

const WAIT: Duration = Duration::from_secs(10);

fn msg(t: &str, payload: impl Into<String>) -> Message {
    Message::new(Topic::new(t).unwrap(), payload.into().into_bytes())
}

fn config(text: &str) -> Config {
    Config::from_toml(text, "test.toml").unwrap()
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_mirror_over_memory_and_redis_delivers_each_message_once() {
    let test = "a_mirror_over_memory_and_redis_delivers_each_message_once";
    let Some(redis) = RedisServer::start(test) else {
        return;
    };
    let text = format!(
        r#"
[buses.mem]
transport = "memory"
[buses.red]
transport = "redis"
url = "{}"
[[routes]]
match = "orders.>"
to = ["mem", "red"]
[router]
dedup_window = 1000
"#,
        redis.url()
    );
    let router = Router::from_config(&config(&text), &busway_cli::registry())
        .await
        .unwrap();
    let mut sub = router
        .subscribe(Pattern::new("orders.>").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    for i in 0..200 {
        router
            .publish(msg("orders.new", i.to_string()))
            .await
            .unwrap();
    }
    router.flush().await.unwrap();
    let mut seqs = BTreeSet::new();
    for _ in 0..200 {
        let d = sub.recv_timeout(WAIT).await.unwrap().unwrap();
        let seq: u32 = std::str::from_utf8(&d.message().payload)
            .unwrap()
            .parse()
            .unwrap();
        assert!(seqs.insert(seq), "message {seq} twice");
    }
    // The remaining copies are taken and dropped; nothing else may come.
    if let Ok(Some(d)) = sub.recv_timeout(Duration::from_millis(500)).await {
        panic!("an extra delivery: {:?}", d.message());
    }
    let stats = sub.stats();
    assert_eq!((stats.delivered, stats.duplicates), (200, 200), "{stats}");
    let per_bus = router.bus_stats();
    assert!(
        per_bus.iter().all(|(_, s)| s.published == 200),
        "{per_bus:?}"
    );
    router.close().await.unwrap();
}

/// Publishes sequence numbers until `stop`; `sent` is how many were accepted.
fn publisher(
    router: Arc<Router>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            router
                .publish(msg("orders.new", i.to_string()))
                .await
                .expect("publish during reload");
            i += 1;
            sent.store(i, Ordering::Relaxed);
            if i.is_multiple_of(16) {
                // A steady stream rather than a flood the subscriber's queue must absorb.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    })
}

fn receiver(
    mut sub: Subscription,
    got: Arc<Mutex<Vec<u64>>>,
) -> tokio::task::JoinHandle<Subscription> {
    tokio::spawn(async move {
        while let Ok(Some(d)) = sub.recv_timeout(Duration::from_secs(3)).await {
            let seq = std::str::from_utf8(&d.message().payload)
                .unwrap()
                .parse()
                .unwrap();
            got.lock().unwrap().push(seq);
        }
        sub
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_a_topic_between_memory_and_redis_under_load() {
    let test = "reload_moves_a_topic_between_memory_and_redis_under_load";
    let Some(redis) = RedisServer::start(test) else {
        return;
    };
    let table = |to: &str| {
        config(&format!(
            r#"
[app]
name = "mover"
[buses.a]
transport = "memory"
[buses.b]
transport = "redis"
url = "{}"
[[routes]]
match = "orders.>"
to = {to}
[default]
to = "a"
[router]
drain_grace = "200ms"
"#,
            redis.url()
        ))
    };
    let registry = busway_cli::registry();
    let router = Arc::new(
        Router::from_config(&table("\"a\""), &registry)
            .await
            .unwrap(),
    );
    let (a, b) = (router.bus("a").unwrap(), router.bus("b").unwrap());
    let sub = router
        .subscribe(Pattern::new("orders.>").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let rx = receiver(sub, got.clone());
    let (stop, sent) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let tx = publisher(router.clone(), stop.clone(), sent.clone());
    let count = || got.lock().unwrap().len();
    // memory -> mirror over memory and Redis -> Redis -> memory, each step under load.
    for to in ["[\"a\", \"b\"]", "\"b\"", "\"a\""] {
        let at = count();
        wait_for("traffic", || count() > at + 500).await;
        let report = router.reload(&table(to), &registry).await.unwrap();
        assert_eq!(report.kept, ["a", "b"], "{report}");
    }
    let at = count();
    wait_for("traffic after the last move", || count() > at + 500).await;
    stop.store(true, Ordering::Relaxed);
    tx.await.unwrap();
    let sent = sent.load(Ordering::Relaxed);
    wait_for("everything received", || count() as u64 >= sent).await;
    let sub = rx.await.unwrap();
    let got = got.lock().unwrap().clone();
    let distinct: BTreeSet<u64> = got.iter().copied().collect();
    let lost = (0..sent).filter(|i| !distinct.contains(i)).count();
    let duplicates = got.len() - distinct.len();
    assert_eq!(
        (lost, duplicates),
        (0, 0),
        "sent {sent}, received {}",
        got.len()
    );
    assert!(a.stats().published > 0 && b.stats().published > 0);
    let stats = sub.stats();
    assert!(stats.duplicates > 0, "the mirror step made copies: {stats}");
    assert_eq!(stats.delivered, sent, "{stats}");
    router.close().await.unwrap();
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_moves_a_running_tail_to_the_new_bus() {
    let test = "sighup_moves_a_running_tail_to_the_new_bus";
    let (Some(old), Some(new)) = (RedisServer::start(test), RedisServer::start(test)) else {
        return;
    };
    let text = |to: &str| {
        format!(
            r#"
[app]
name = "tailer"
[buses.old]
transport = "redis"
url = "{}"
[buses.new]
transport = "redis"
url = "{}"
[[routes]]
match = "orders.>"
to = "{to}"
[default]
to = "old"
[router]
drain_grace = "100ms"
"#,
            old.url(),
            new.url()
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("busway.toml");
    write(&path, &text("old"));
    let mut tail = Spawned::start(&[
        "tail",
        "orders.>",
        "--config",
        path.to_str().unwrap(),
        "--count",
        "2",
        "--timeout",
        "30",
    ]);
    tail.wait_stderr("tailing orders.>", WAIT);
    let registry = busway_cli::registry();
    let before = Router::from_config(&Config::load(&path).unwrap(), &registry)
        .await
        .unwrap();
    before.publish(msg("orders.x", "on old")).await.unwrap();
    before.close().await.unwrap();

    write(&path, &text("new"));
    tail.signal("-HUP");
    tail.wait_stderr("busway: reloaded", WAIT);
    let after = Router::from_config(&Config::load(&path).unwrap(), &registry)
        .await
        .unwrap();
    assert_eq!(
        &*after.route(&Topic::new("orders.x").unwrap()).unwrap()[0],
        "new"
    );
    after.publish(msg("orders.x", "on new")).await.unwrap();
    after.close().await.unwrap();
    let (code, stdout, stderr) = tail.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "orders.x on old\norders.x on new\n", "{stderr}");
    assert!(
        stderr.contains("kept: new, old"),
        "the routing changed, not the buses: {stderr}"
    );
}

#[tokio::test]
async fn audit_groups_redis_connections_by_app_bus_and_client_name() {
    let test = "audit_groups_redis_connections_by_app_bus_and_client_name";
    let Some(redis) = RedisServer::start(test) else {
        return;
    };
    let url = redis.url();
    let app = |name: &str, buses: &[&str]| {
        let mut text = format!("[app]\nname = \"{name}\"\n");
        for bus in buses {
            text.push_str(&format!(
                "[buses.{bus}]\ntransport = \"redis\"\nurl = \"{url}\"\n"
            ));
        }
        text.push_str(&format!("[default]\nto = \"{}\"\n", buses[0]));
        config(&text)
    };
    let registry = busway_cli::registry();
    // portfolio: main with a subscription (command + pub/sub = 2), engine publish-only (1).
    let portfolio = Router::from_config(&app("portfolio", &["main", "engine"]), &registry)
        .await
        .unwrap();
    let _sub = portfolio
        .bus("main")
        .unwrap()
        .subscribe(Pattern::new("x.>").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    // ml: main only, publish-only (1).
    let ml = Router::from_config(&app("ml", &["main"]), &registry)
        .await
        .unwrap();
    for r in [&portfolio, &ml] {
        r.publish(msg("x.y", "hi")).await.unwrap();
        r.flush().await.unwrap();
    }
    // Two clients that are not busway: one named, one unnamed.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut named = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("legacy-engine")
        .query_async(&mut named)
        .await
        .unwrap();
    let mut unnamed = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = redis::cmd("PING").query_async(&mut unnamed).await.unwrap();

    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_busway"))
            .args(["audit", &url, "--json", "--interval-ms", "100"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["kind"], "redis");
    assert_eq!(json["apps"]["portfolio"]["main"], 2, "{json}");
    assert_eq!(json["apps"]["portfolio"]["engine"], 1, "{json}");
    assert_eq!(json["apps"]["ml"]["main"], 1, "{json}");
    let other: Vec<(String, u64)> = json["other"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["name"].as_str().unwrap().to_string(),
                o["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        other,
        [
            ("(unnamed)".to_string(), 1),
            ("legacy-engine".to_string(), 1)
        ],
        "{json}"
    );
    assert_eq!(json["total_connections"], 6, "{json}");
    assert!(
        json["cpu_percent"].as_f64().is_some_and(|p| p >= 0.0),
        "{json}"
    );

    // The text form answers the migration's question; once ml closes (and the server has
    // seen its connection go), ml is gone from it.
    // Closed but not dropped: a closed bus holds no connection.
    ml.close().await.unwrap();
    let url = redis.url();
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let url = url.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_busway"))
                .args(["audit", &url, "--interval-ms", "20"])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !text.contains(" ml ") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(text.contains("apps still connected: portfolio\n"), "{text}");
    portfolio.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_of_a_sentinel_set_groups_connections_per_app_over_its_nodes() {
    let test = "audit_of_a_sentinel_set_groups_connections_per_app_over_its_nodes";
    let Some(set) = busway_testkit::redis_sentinel::SentinelSet::start(test) else {
        return;
    };
    let url = set.url();
    let app = |name: &str| {
        config(&format!(
            "[app]\nname = \"{name}\"\n[buses.main]\ntransport = \"redis\"\nurl = \"{url}\"\n[default]\nto = \"main\"\n"
        ))
    };
    let registry = busway_cli::registry();
    // portfolio: a subscription (command + pub/sub = 2); ml: publish-only (1).
    let portfolio = Router::from_config(&app("portfolio"), &registry)
        .await
        .unwrap();
    let _sub = portfolio
        .bus("main")
        .unwrap()
        .subscribe(Pattern::new("x.>").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    let ml = Router::from_config(&app("ml"), &registry).await.unwrap();
    for r in [&portfolio, &ml] {
        r.publish(msg("x.y", "hi")).await.unwrap();
        r.flush().await.unwrap();
    }
    let primary = set.primary().unwrap();
    let primary_addr = format!("127.0.0.1:{}", set.nodes()[primary].port());
    let replica_addr = format!("127.0.0.1:{}", set.nodes()[1 - primary].port());
    let audit_url = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_busway"))
            .args(["audit", &audit_url, "--json", "--interval-ms", "50"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["kind"], "redis");
    assert_eq!(json["apps"]["portfolio"]["main"], 2, "{json}");
    assert_eq!(json["apps"]["ml"]["main"], 1, "{json}");
    let nodes: Vec<&str> = json["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        nodes,
        [
            format!("primary {primary_addr}"),
            format!("replica {replica_addr}")
        ],
        "{json}"
    );
    let row = json["busway"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["app"] == "portfolio")
        .unwrap();
    assert_eq!(row["nodes"][format!("primary {primary_addr}")], 2, "{json}");
    portfolio.close().await.unwrap();
    ml.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_of_a_redis_cluster_groups_connections_per_app_over_its_nodes() {
    let test = "audit_of_a_redis_cluster_groups_connections_per_app_over_its_nodes";
    let Some(cluster) = busway_testkit::redis_cluster::RedisCluster::start(test) else {
        return;
    };
    let url = cluster.url();
    let config = config(&format!(
        "[app]\nname = \"portfolio\"\n[buses.main]\ntransport = \"redis\"\nurl = \"{url}\"\n[default]\nto = \"main\"\n"
    ));
    let router = Router::from_config(&config, &busway_cli::registry())
        .await
        .unwrap();
    let _sub = router
        .bus("main")
        .unwrap()
        .subscribe(Pattern::new("x.y").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    router.publish(msg("x.y", "hi")).await.unwrap();
    router.flush().await.unwrap();
    let audit_url = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_busway"))
            .args(["audit", &audit_url, "--json", "--interval-ms", "50"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = json["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 6, "every node of the cluster: {json}");
    let row = json["busway"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["app"] == "portfolio" && r["bus"] == "main")
        .unwrap_or_else(|| panic!("portfolio/main: {json}"));
    // The command connection and the pub/sub connection reach every primary.
    for p in cluster.primaries() {
        let name = format!("primary 127.0.0.1:{}", cluster.nodes()[p].port());
        assert!(
            row["nodes"][&name].as_u64().unwrap_or(0) >= 1,
            "no connection of portfolio/main on {name}: {json}"
        );
    }
    router.close().await.unwrap();
}

#[tokio::test]
async fn audit_reads_nats_connections_from_the_monitoring_port() {
    let test = "audit_reads_nats_connections_from_the_monitoring_port";
    let Some(nats) = busway_testkit::nats::NatsServer::start(test) else {
        return;
    };
    let text = format!(
        "[app]\nname = \"features\"\n[buses.marketdata]\ntransport = \"nats\"\nurl = \"{}\"\n[default]\nto = \"marketdata\"\n",
        nats.url()
    );
    let router = Router::from_config(&config(&text), &busway_cli::registry())
        .await
        .unwrap();
    let monitor = format!("http://127.0.0.1:{}", nats.monitor_port());
    let nats_url = nats.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_busway"))
            .args(["audit", &nats_url, "--monitor", &monitor, "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["kind"], "nats");
    assert_eq!(json["apps"]["features"]["marketdata"], 1, "{json}");
    assert_eq!(json["total_connections"], 1, "{json}");
    assert!(json["cpu_percent"].as_f64().is_some(), "{json}");
    router.close().await.unwrap();
}

#[tokio::test]
async fn audit_sums_an_app_over_the_nodes_of_a_nats_cluster() {
    let test = "audit_sums_an_app_over_the_nodes_of_a_nats_cluster";
    let Some(mut cluster) = busway_testkit::nats_cluster::NatsCluster::start(test) else {
        return;
    };
    // One router per node (its only seed URL), and one more on node 0.
    let mut routers = Vec::new();
    for i in [0, 1, 2, 0] {
        let text = format!(
            "[app]\nname = \"features\"\n[buses.marketdata]\ntransport = \"nats\"\nurl = \"{}\"\n[default]\nto = \"marketdata\"\n",
            cluster.node(i).url()
        );
        routers.push(
            Router::from_config(&config(&text), &busway_cli::registry())
                .await
                .unwrap(),
        );
    }
    let monitors: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| format!("http://127.0.0.1:{}", n.monitor_port()))
        .collect();
    let monitors = monitors.join(",");
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_busway"))
                .args(args)
                .output()
                .unwrap()
        })
    };
    let out = run(vec!["audit".into(), monitors.clone(), "--json".into()])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["apps"]["features"]["marketdata"], 4, "{json}");
    assert_eq!(json["total_connections"], 4, "{json}");
    let row = &json["busway"][0];
    assert_eq!(row["nodes"]["n0"], 2, "{json}");
    assert_eq!(row["nodes"]["n1"], 1, "{json}");
    assert_eq!(row["nodes"]["n2"], 1, "{json}");
    assert_eq!(json["nodes"].as_array().map(Vec::len), Some(3), "{json}");
    let out = run(vec!["audit".into(), monitors]).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("n0=2 n1=1 n2=1"), "{text}");
    for r in routers {
        r.close().await.unwrap();
    }
}
