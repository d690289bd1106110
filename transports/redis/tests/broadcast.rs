//! Broadcast mode against a real redis-server started per test.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busway::{Bus, ErrorKind, Health, Message, Mode, Pattern, SubscribeOptions};
use busway_redis::{Framing, OnDisconnect, RedisBus, RedisConfig};
use busway_testkit::redis::RedisServer;

use common::{assert_refused, connect, topic, wait_for, WAIT};

async fn bus(url: &str, f: impl FnOnce(&mut RedisConfig)) -> RedisBus {
    connect("main", url, Mode::Broadcast, f).await
}

#[tokio::test]
async fn round_trip_carries_headers() {
    let Some(server) = RedisServer::start("round_trip_carries_headers") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let mut sub = bus
        .subscribe(Pattern::new("quotes.*").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    let mut m = Message::new(topic("quotes.AAPL"), &b"189.5"[..])
        .with_id("m1")
        .with_content_type("text/plain")
        .with_header("venue", "XNAS")
        .stamped();
    m.headers.correlation_id = Some("c1".into());
    bus.publish(m.clone()).await.unwrap();
    let d = sub.recv_timeout(WAIT).await.unwrap().expect("a delivery");
    assert_eq!(d.message(), &m);
    assert_eq!(bus.stats().published, 1);
    bus.close().await.unwrap();
    assert_eq!(bus.stats().health, Health::Closed);
    assert!(
        sub.recv_timeout(WAIT).await.unwrap().is_none(),
        "close ends subscriptions"
    );
    assert_eq!(
        bus.publish(Message::new(topic("x"), &b""[..]))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Closed
    );
}

#[tokio::test]
async fn wildcards_filter_exactly_on_the_client() {
    let Some(server) = RedisServer::start("wildcards_filter_exactly") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let mut one = bus
        .subscribe(Pattern::new("a.*").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    let mut rest = bus
        .subscribe(Pattern::new("a.>").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    let mut mid = bus
        .subscribe(Pattern::new("a.*.c").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    let mut lit = bus
        .subscribe(Pattern::new("a.b").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    // A glob metacharacter in a literal token must not act as a wildcard.
    let mut q = bus
        .subscribe(Pattern::new("a.?").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    for t in ["a.b", "a.b.c", "a.x.c.d", "b.x", "a", "a.?", "a.bb.c"] {
        bus.publish(Message::new(topic(t), t.as_bytes().to_vec()))
            .await
            .unwrap();
    }
    bus.publish(Message::new(topic("end"), &b""[..]))
        .await
        .unwrap();
    bus.flush().await.unwrap();
    let mut end = bus
        .subscribe(Pattern::new("end2").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(Message::new(topic("end2"), &b""[..]))
        .await
        .unwrap();
    end.recv_timeout(WAIT).await.unwrap().unwrap();
    async fn got(s: &mut busway::Subscription) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(Some(d)) = s.recv_timeout(Duration::from_millis(300)).await {
            v.push(d.message().topic.to_string());
        }
        v
    }
    assert_eq!(got(&mut one).await, ["a.b", "a.?"]);
    assert_eq!(
        got(&mut rest).await,
        ["a.b", "a.b.c", "a.x.c.d", "a.?", "a.bb.c"]
    );
    assert_eq!(got(&mut mid).await, ["a.b.c", "a.bb.c"]);
    assert_eq!(got(&mut lit).await, ["a.b"]);
    assert_eq!(got(&mut q).await, ["a.?"]);
}

#[tokio::test]
async fn raw_framing_interoperates_with_redis_cli() {
    let Some(server) = RedisServer::start("raw_framing_interop") else {
        return;
    };
    let bus = bus(&server.url(), |c| c.framing = Framing::Raw).await;
    assert!(!bus.capabilities().headers);
    // redis-cli PUBLISH -> busway subscriber.
    let mut sub = bus
        .subscribe(Pattern::new("legacy.*").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    let out = server.cli(&["PUBLISH", "legacy.prices", "hello from cli"]);
    assert_eq!(out.trim(), "1", "one subscriber (busway) received it");
    let d = sub.recv_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(d.message().topic.as_str(), "legacy.prices");
    assert_eq!(&d.message().payload[..], b"hello from cli");

    // busway publish -> redis-cli SUBSCRIBE.
    let mut child = server
        .cli_command(&["SUBSCRIBE", "legacy.out"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    // Wait for redis-cli to be subscribed (the server counts it).
    wait_for("redis-cli to subscribe", || {
        server
            .cli(&["PUBSUB", "NUMSUB", "legacy.out"])
            .lines()
            .nth(1)
            == Some("1")
    })
    .await;
    bus.publish(Message::new(topic("legacy.out"), &b"hello from busway"[..]))
        .await
        .unwrap();
    bus.flush().await.unwrap();
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.push(line.clone());
            if line == "hello from busway" {
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter().any(|l| l == "hello from busway"),
        "redis-cli printed {seen:?}"
    );
}

#[tokio::test]
async fn garbage_is_counted_and_skipped() {
    let Some(server) = RedisServer::start("garbage_is_counted") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let mut sub = bus
        .subscribe(Pattern::new("g.>").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    server.cli(&["PUBLISH", "g.x", "not a busway frame"]);
    server.cli(&["PUBLISH", "g.x", ""]);
    // Not a busway topic (a space), caught by the glob of `g.>`.
    server.cli(&["PUBLISH", "g.bad topic", "x"]);
    bus.publish(Message::new(topic("g.y"), &b"ok"[..]))
        .await
        .unwrap();
    let d = sub.recv_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(
        &d.message().payload[..],
        b"ok",
        "the subscription survives garbage"
    );
    assert_eq!(bus.stats().decode_errors, 3);
}

/// `unframed = "deliver"`: a foreign client's payloads (text, JSON, an empty one) arrive as
/// they were sent, without headers, counted in `unframed`; busway frames on the same bus keep
/// their headers and request/reply; a channel that is not a busway topic is still skipped.
#[tokio::test]
async fn unframed_deliver_takes_foreign_payloads_as_header_less_messages() {
    let Some(server) = RedisServer::start("unframed_deliver") else {
        return;
    };
    let bus = bus(&server.url(), |c| {
        c.unframed = busway_redis::Unframed::Deliver
    })
    .await;
    let mut sub = bus
        .subscribe(Pattern::new("g.>").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    server.cli(&["PUBLISH", "g.x", r#"{"symbol":"AAPL","px":1.5}"#]);
    server.cli(&["PUBLISH", "g.x", ""]);
    server.cli(&["PUBLISH", "g.bad topic", "x"]);
    let mut framed = Message::new(topic("g.y"), &b"ok"[..]);
    framed.headers.insert("k", "v");
    bus.publish(framed).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(sub.recv_timeout(WAIT).await.unwrap().unwrap());
    }
    assert_eq!(
        &got[0].message().payload[..],
        br#"{"symbol":"AAPL","px":1.5}"#
    );
    assert_eq!(got[0].message().topic, topic("g.x"));
    assert!(got[0].message().headers.get("k").is_none());
    assert_eq!(got[0].message().headers.reply_to, None);
    assert_eq!(&got[1].message().payload[..], b"");
    assert_eq!(&got[2].message().payload[..], b"ok");
    assert_eq!(
        got[2].message().headers.get("k"),
        Some("v"),
        "frames keep headers"
    );
    let stats = bus.stats();
    assert_eq!(stats.unframed, 2, "{stats:?}");
    assert_eq!(
        stats.decode_errors, 1,
        "the channel that is no topic: {stats:?}"
    );

    // Request/reply between busway processes still works on such a bus.
    let mut svc = bus
        .subscribe(Pattern::new("svc.echo").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(d) = svc.recv().await {
            d.reply(&b"re"[..]).await.unwrap();
        }
    });
    let reply = bus
        .request(Message::new(topic("svc.echo"), &b"hi"[..]), WAIT)
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"re");
}

#[tokio::test]
async fn request_reply_round_trip() {
    let Some(server) = RedisServer::start("broadcast_request_reply") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let mut svc = bus
        .subscribe(Pattern::new("svc.echo").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(d) = svc.recv().await {
            let mut p = b"re:".to_vec();
            p.extend_from_slice(&d.message().payload);
            d.reply(p).await.unwrap();
        }
    });
    let reply = bus
        .request(Message::new(topic("svc.echo"), &b"hi"[..]), WAIT)
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"re:hi");
    let err = bus
        .request(
            Message::new(topic("svc.nobody"), &b"hi"[..]),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.to_string().contains("svc.nobody"), "{err}");
}

#[tokio::test]
async fn groups_are_refused_in_broadcast_mode() {
    let Some(server) = RedisServer::start("groups_refused") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let err = bus
        .subscribe(
            Pattern::new("a").unwrap(),
            SubscribeOptions::new().group("g"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("stream"), "{err}");
}

#[tokio::test]
async fn restart_reconnects_resubscribes_and_delivers() {
    let Some(mut server) = RedisServer::start("broadcast_restart") else {
        return;
    };
    let bus = bus(&server.url(), |_| {}).await;
    let mut lit = bus
        .subscribe(Pattern::new("r.lit").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    let mut wild = bus
        .subscribe(Pattern::new("r.*").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(Message::new(topic("r.lit"), &b"before"[..]))
        .await
        .unwrap();
    assert_eq!(
        &lit.recv_timeout(WAIT)
            .await
            .unwrap()
            .unwrap()
            .message()
            .payload[..],
        b"before"
    );
    wild.recv_timeout(WAIT).await.unwrap().unwrap();

    server.kill();
    wait_for("health to leave up", || {
        bus.stats().health == Health::Connecting
    })
    .await;
    server.restart();
    wait_for("health up again", || bus.stats().health == Health::Up).await;
    assert!(
        bus.stats().reconnects >= 2,
        "command and pub/sub reconnected: {}",
        bus.stats()
    );
    // Resubscribed: the server counts our channel and pattern again.
    wait_for("resubscription", || {
        server.cli(&["PUBSUB", "NUMSUB", "r.lit"]).lines().nth(1) == Some("1")
            && server.cli(&["PUBSUB", "NUMPAT"]).trim() == "1"
    })
    .await;
    bus.publish(Message::new(topic("r.lit"), &b"after"[..]))
        .await
        .unwrap();
    assert_eq!(
        &lit.recv_timeout(WAIT)
            .await
            .unwrap()
            .unwrap()
            .message()
            .payload[..],
        b"after"
    );
    assert_eq!(
        &wild
            .recv_timeout(WAIT)
            .await
            .unwrap()
            .unwrap()
            .message()
            .payload[..],
        b"after"
    );
}

#[tokio::test]
async fn outage_policy_fail_names_bus_and_hides_password() {
    let Some(mut server) = RedisServer::start_with_password("outage_fail", "s3cret-pw") else {
        return;
    };
    let bus = bus(&server.url(), |c| c.on_disconnect = OnDisconnect::Fail).await;
    bus.publish(Message::new(topic("x"), &b"1"[..]))
        .await
        .unwrap();
    server.kill();
    wait_for("health to leave up", || {
        bus.stats().health == Health::Connecting
    })
    .await;
    let err = bus
        .publish(Message::new(topic("x"), &b"2"[..]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection);
    let text = format!("{err} {err:?} {bus:?}");
    assert!(text.contains("\"main\""), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", server.port())),
        "{text}"
    );
    assert!(!text.contains("s3cret-pw"), "{text}");
    assert!(bus.stats().errors >= 1);
    server.restart();
    wait_for("health up again", || bus.stats().health == Health::Up).await;
    bus.publish(Message::new(topic("x"), &b"3"[..]))
        .await
        .unwrap();
}

#[tokio::test]
async fn outage_policy_buffer_holds_then_sends_and_bounds() {
    let Some(mut server) = RedisServer::start("outage_buffer") else {
        return;
    };
    let url = server.url();
    let bus = Arc::new(bus(&url, |c| c.publish_buffer = 5).await);
    server.kill();
    wait_for("health to leave up", || {
        bus.stats().health == Health::Connecting
    })
    .await;
    for i in 0..5 {
        bus.publish(Message::new(topic("buf"), vec![i]))
            .await
            .unwrap();
    }
    let err = bus
        .publish(Message::new(topic("buf"), vec![9]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BufferFull);
    assert!(err.to_string().contains("publish_buffer = 5"), "{err}");
    server.restart();
    // Subscribe from a second bus once the server is back: the buffered messages are sent
    // after the command connection returns, so count them on the server instead.
    wait_for("health up again", || bus.stats().health == Health::Up).await;
    bus.flush().await.unwrap();
    let stats = server.cli(&["INFO", "stats"]);
    let _ = stats; // PUBLISH without subscribers is still a processed command
    let cmdstats = server.cli(&["INFO", "commandstats"]);
    let publishes: u64 = cmdstats
        .lines()
        .find(|l| l.starts_with("cmdstat_publish:"))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|s| s.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert_eq!(publishes, 5, "{cmdstats}");
}

#[tokio::test]
async fn connection_count_is_fixed_and_named() {
    let Some(server) = RedisServer::start("connection_count") else {
        return;
    };
    let bus: Arc<dyn Bus> = Arc::new(bus(&server.url(), |_| {}).await);
    // 7 engines sharing the bus, 50 subscriptions between them.
    let mut subs = Vec::new();
    for engine in 0..7 {
        let bus = bus.clone();
        for s in 0..8 {
            if subs.len() == 50 {
                break;
            }
            let p = if s % 2 == 0 {
                format!("e{engine}.t{s}")
            } else {
                format!("e{engine}.*.t{s}")
            };
            subs.push(
                bus.subscribe(Pattern::new(&p).unwrap(), SubscribeOptions::new())
                    .await
                    .unwrap(),
            );
        }
    }
    assert_eq!(subs.len(), 50);
    let list = server.cli(&["CLIENT", "LIST"]);
    let ours = list
        .lines()
        .filter(|l| l.contains("name=busway:test:main "))
        .count();
    assert_eq!(ours, 2, "one command + one pub/sub connection:\n{list}");
    assert_eq!(bus.stats().connections, 2);
}

#[tokio::test]
async fn factory_config_errors_name_file_and_key() {
    // Each refused by validate, without a server, with build's message.
    let cases = [
        (
            "url = \"redis://127.0.0.1:1\"\nframing = \"rawx\"",
            "cfg.toml: buses.main.framing: unknown variant `rawx`",
        ),
        (
            "url = \"redis://127.0.0.1:1\"\nbogus = 1",
            "cfg.toml: buses.main.bogus: unknown field `bogus`",
        ),
        ("", "cfg.toml: buses.main.url: is required"),
        (
            "url = \"http://u:pw@h\"",
            "cfg.toml: buses.main.url: \"http://u:***@h\" is not a redis URL",
        ),
        (
            "url = \"redis://u:pw@127.0.0.1:99999\"",
            "cfg.toml: buses.main.url: \"redis://u:***@127.0.0.1:99999\" cannot be parsed",
        ),
        (
            "url = \"redis://127.0.0.1:1\"\nmax_deliveries = 3",
            "cfg.toml: buses.main.max_deliveries: needs dead_letter",
        ),
        (
            "url = \"redis://127.0.0.1:1\"\nmode = \"stream\"\nframing = \"raw\"",
            "cfg.toml: buses.main.framing",
        ),
        (
            "url = \"redis://u:pw@127.0.0.1:1\"\ntls_ca = \"ca.pem\"",
            "cfg.toml: buses.main.tls_ca: applies to rediss:// URLs only; the url is \"redis://u:***@127.0.0.1:1\"",
        ),
        (
            "url = \"redis://127.0.0.1:1\"\npublish_timeout = \"5 parsecs\"",
            "cfg.toml: buses.main.publish_timeout: invalid duration",
        ),
    ];
    for (body, want) in cases {
        assert_refused(body, want).await;
    }
    let mut registry = busway::Registry::new();
    busway_redis::register(&mut registry);
    // Valid, and nothing listens on port 1: a connection error naming the bus.
    let config = busway::Config::from_toml(
        "[buses.main]\ntransport = \"redis\"\nurl = \"redis://u:pw@127.0.0.1:1\"\n",
        "cfg.toml",
    )
    .unwrap();
    let ctx = busway::transport::BuildContext {
        app: "test",
        bus: "main",
        config: &config.buses["main"],
        source: "cfg.toml",
    };
    let err = registry.build_context(ctx).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.to_string().contains("\"main\""), "{err}");
    assert!(!format!("{err} {err:?}").contains(":pw@"), "{err}");
}

#[tokio::test]
async fn renamed_keys_are_refused_naming_the_new_key() {
    let cases = [
        ("buffer_max = 5", "buffer_max: renamed to `publish_buffer`"),
        (
            "block_ms = 100",
            "block_ms: renamed to `read_block`, a duration with a unit",
        ),
        (
            "response_timeout_ms = 500",
            "response_timeout_ms: renamed to `publish_timeout`",
        ),
        (
            "claim_idle_ms = 500",
            "claim_idle_ms: renamed to `claim_idle`",
        ),
    ];
    for (key, want) in cases {
        let body = format!("url = \"redis://127.0.0.1:1\"\n{key}");
        assert_refused(&body, &format!("cfg.toml: buses.main.{want}")).await;
    }
}

#[tokio::test]
async fn durations_take_a_unit_or_whole_seconds() {
    let text = "[buses.main]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\n\
                publish_timeout = \"250ms\"\nconnect_timeout = 3\nclaim_idle = \"2m\"\n";
    let config = busway::Config::from_toml(text, "cfg.toml").unwrap();
    let ctx = busway::transport::BuildContext {
        app: "test",
        bus: "main",
        config: &config.buses["main"],
        source: "cfg.toml",
    };
    let config = RedisConfig::from_context(&ctx).unwrap();
    assert_eq!(config.publish_timeout, Duration::from_millis(250));
    assert_eq!(config.connect_timeout, Duration::from_secs(3));
    assert_eq!(config.claim_idle, Some(Duration::from_secs(120)));
    assert_eq!(config.read_block, Duration::from_millis(500), "a default");
}

#[tokio::test]
async fn password_right_works_wrong_is_auth_error_without_the_password() {
    let Some(server) = RedisServer::start_with_password("password_auth", "right-pw") else {
        return;
    };
    let ok = bus(&server.url(), |_| {}).await;
    let mut sub = ok
        .subscribe(Pattern::new("p").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    ok.publish(Message::new(topic("p"), &b"x"[..]))
        .await
        .unwrap();
    sub.recv_timeout(WAIT).await.unwrap().unwrap();
    let wrong = format!("redis://:wrong-pw@127.0.0.1:{}", server.port());
    let err = RedisBus::connect(RedisConfig::new("main", wrong))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    let text = format!("{err} {err:?}");
    assert!(
        !text.contains("wrong-pw") && text.contains("\"main\""),
        "{text}"
    );
}
