//! Broadcast mode on a real nats-server: headers, wildcards, queue groups, request/reply,
//! raw interop, restart, auth, slow consumers.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use busway::{Bus, ErrorKind, Headers, Message, Mode, Overflow, SubscribeOptions};
use busway_testkit::nats::{NatsServer, NatsServerOptions};
use common::{connect, next, pattern, topic, wait_until, WAIT};
use futures::StreamExt;

#[tokio::test]
async fn round_trip_keeps_every_header_and_names_the_connection() {
    let Some(server) = NatsServer::start("round_trip") else {
        return;
    };
    let bus = connect(&server.url(), "md", Mode::Broadcast, "")
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(pattern("q.AAPL"), SubscribeOptions::new())
        .await
        .unwrap();
    let headers = Headers {
        id: Some("id-1".into()),
        timestamp_us: Some(1_700_000_000_000_000),
        source: Some("portfolio".into()),
        content_type: Some("application/json".into()),
        reply_to: Some(topic("replies.here")),
        correlation_id: Some("corr-9".into()),
        extra: vec![
            ("z-key".into(), "1".into()),
            ("a-key".into(), "v: 2".into()),
        ],
    };
    let sent = Message {
        topic: topic("q.AAPL"),
        payload: bytes::Bytes::from_static(b"{\"bid\":1.5}"),
        headers,
    };
    bus.publish(sent.clone()).await.unwrap();
    let got = next(&mut sub).await;
    assert_eq!(got.message(), &sent);
    assert_eq!(got.attempt(), 1);
    assert!(!got.is_ackable());

    let connz = server.monitor("/connz");
    assert!(connz.contains("\"name\": \"busway:test:md\""), "{connz}");
    assert_eq!(
        connz.matches("busway:test:md").count(),
        1,
        "one connection per bus: {connz}"
    );
    let stats = bus.stats();
    assert_eq!(
        (stats.published, stats.delivered, stats.connections),
        (1, 1, 1)
    );
    bus.close().await.unwrap();
    let err = bus.publish(sent).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
}

#[tokio::test]
async fn wildcards_follow_nats_rules() {
    let Some(server) = NatsServer::start("wildcards") else {
        return;
    };
    let bus = connect(&server.url(), "md", Mode::Broadcast, "")
        .await
        .unwrap();
    let mut one = bus
        .subscribe(pattern("md.*.AAPL"), SubscribeOptions::new())
        .await
        .unwrap();
    let mut rest = bus
        .subscribe(pattern("md.>"), SubscribeOptions::new())
        .await
        .unwrap();
    for t in [
        "md.quotes.AAPL",
        "md.quotes.MSFT",
        "md.trades.x.AAPL",
        "other.quotes.AAPL",
    ] {
        bus.publish(Message::new(topic(t), "x")).await.unwrap();
    }
    bus.publish(Message::new(topic("md.end.AAPL"), "end"))
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        let d = next(&mut one).await;
        got.push(d.message().topic.to_string());
        if d.message().topic.as_str() == "md.end.AAPL" {
            break;
        }
    }
    assert_eq!(got, ["md.quotes.AAPL", "md.end.AAPL"]);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next(&mut rest).await.message().topic.to_string());
    }
    assert_eq!(
        got,
        [
            "md.quotes.AAPL",
            "md.quotes.MSFT",
            "md.trades.x.AAPL",
            "md.end.AAPL"
        ]
    );
}

#[tokio::test]
async fn queue_groups_split_and_plain_subscribers_get_all() {
    let Some(server) = NatsServer::start("queue_groups") else {
        return;
    };
    let bus = connect(&server.url(), "eng", Mode::Broadcast, "")
        .await
        .unwrap();
    let g = || SubscribeOptions::new().group("workers");
    let mut a = bus.subscribe(pattern("jobs.*"), g()).await.unwrap();
    let mut b = bus.subscribe(pattern("jobs.*"), g()).await.unwrap();
    let mut all = bus
        .subscribe(pattern("jobs.*"), SubscribeOptions::new())
        .await
        .unwrap();
    let n = 200;
    for i in 0..n {
        bus.publish(Message::new(topic("jobs.x"), format!("{i}")))
            .await
            .unwrap();
    }
    for _ in 0..n {
        next(&mut all).await;
    }
    let (mut from_a, mut from_b) = (0, 0);
    while from_a + from_b < n {
        tokio::select! {
            d = a.recv() => { d.unwrap(); from_a += 1; }
            d = b.recv() => { d.unwrap(); from_b += 1; }
            _ = tokio::time::sleep(WAIT) => panic!("group got {} of {n}", from_a + from_b),
        }
    }
    assert!(from_a > 0 && from_b > 0, "split {from_a}/{from_b}");
    // Nothing is delivered twice within the group.
    assert!(a.recv_timeout(Duration::from_millis(300)).await.is_err());
    assert!(b.recv_timeout(Duration::from_millis(300)).await.is_err());
}

#[tokio::test]
async fn request_reply_and_no_responders() {
    let Some(server) = NatsServer::start("request_reply") else {
        return;
    };
    let bus = connect(&server.url(), "rpc", Mode::Broadcast, "")
        .await
        .unwrap();
    let mut service = bus
        .subscribe(pattern("svc.echo"), SubscribeOptions::new())
        .await
        .unwrap();
    let responder = tokio::spawn(async move {
        let d = next(&mut service).await;
        let mut answer = b"echo:".to_vec();
        answer.extend_from_slice(&d.message().payload);
        d.reply(answer).await.unwrap();
    });
    let reply = bus
        .request(Message::new(topic("svc.echo"), "hi"), WAIT)
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"echo:hi");
    assert!(reply.headers.correlation_id.is_some());
    responder.await.unwrap();

    let err = bus
        .request(Message::new(topic("svc.nobody"), "hi"), WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoResponders, "{err}");
    assert!(err.to_string().contains("svc.nobody"), "{err}");

    // A responder that never answers: a timeout naming the subject.
    let _silent = bus
        .subscribe(pattern("svc.slow"), SubscribeOptions::new())
        .await
        .unwrap();
    let err = bus
        .request(
            Message::new(topic("svc.slow"), "hi"),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.to_string().contains("svc.slow"), "{err}");
}

/// A client speaking the NATS text protocol over a plain socket.
struct RawClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RawClient {
    /// Sends `text` on a new raw connection and waits until the server has processed it.
    async fn send_once(port: u16, text: &'static str) {
        tokio::task::spawn_blocking(move || {
            let mut raw = RawClient::connect(port);
            raw.send(text);
            raw.sync();
        })
        .await
        .unwrap();
    }

    fn connect(port: u16) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut c = RawClient {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let mut info = String::new();
        c.reader.read_line(&mut info).unwrap();
        assert!(info.starts_with("INFO "), "{info}");
        c.send("CONNECT {\"verbose\":false,\"name\":\"raw\"}\r\n");
        c
    }

    fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    /// Sends PING and waits for PONG: the server has processed everything before it.
    fn sync(&mut self) {
        self.send("PING\r\n");
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            if line.starts_with("PONG") {
                return;
            }
        }
    }

    /// The next `MSG`: (subject, reply, payload).
    fn next_msg(&mut self) -> (String, Option<String>, Vec<u8>) {
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            if line.starts_with("PING") {
                self.send("PONG\r\n");
                continue;
            }
            if line.starts_with("MSG ") {
                break;
            }
        }
        let parts: Vec<&str> = line.trim_end().split(' ').collect();
        let (subject, reply, len) = match parts.len() {
            4 => (parts[1], None, parts[3]),
            5 => (parts[1], Some(parts[3].to_string()), parts[4]),
            _ => panic!("unexpected {line:?}"),
        };
        let mut payload = vec![0; len.parse::<usize>().unwrap() + 2];
        self.reader.read_exact(&mut payload).unwrap();
        payload.truncate(payload.len() - 2);
        (subject.to_string(), reply, payload)
    }
}

#[tokio::test]
async fn raw_nats_clients_interoperate() {
    let Some(server) = NatsServer::start("raw_interop") else {
        return;
    };
    let port = server.port();
    let bus = connect(&server.url(), "raw", Mode::Broadcast, "framing = \"raw\"")
        .await
        .unwrap();
    assert!(!bus.capabilities().headers);

    // A foreign publisher reaches a busway subscriber, headers empty.
    let mut sub = bus
        .subscribe(pattern("legacy.>"), SubscribeOptions::new())
        .await
        .unwrap();
    RawClient::send_once(port, "PUB legacy.prices 5\r\nhello\r\n").await;
    let d = next(&mut sub).await;
    assert_eq!(d.message().topic.as_str(), "legacy.prices");
    assert_eq!(&d.message().payload[..], b"hello");
    assert_eq!(d.message().headers, Headers::default());

    // A busway publish arrives as a plain MSG on a raw SUB (no headers: raw framing).
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = tokio::task::spawn_blocking(move || {
        let mut raw = RawClient::connect(port);
        raw.send("SUB out.* 1\r\n");
        raw.sync();
        ready_tx.send(()).unwrap();
        raw.next_msg()
    });
    tokio::task::spawn_blocking(move || ready_rx.recv_timeout(WAIT).unwrap())
        .await
        .unwrap();
    let msg = Message::new(topic("out.x"), "from busway").with_id("ignored-in-raw");
    bus.publish(msg).await.unwrap();
    let (subject, reply, payload) = reader.await.unwrap();
    assert_eq!(subject, "out.x");
    assert_eq!(reply, None);
    assert_eq!(payload, b"from busway");

    // A foreign requester is answered through the NATS reply subject.
    let mut svc = bus
        .subscribe(pattern("legacy.rpc"), SubscribeOptions::new())
        .await
        .unwrap();
    let requester = tokio::task::spawn_blocking(move || {
        let mut raw = RawClient::connect(port);
        raw.send("SUB my.inbox 7\r\n");
        // No `sync` after the PUB: the reply may come back before the PONG, and `sync` skips
        // whatever precedes the PONG. The SUB is ordered before the PUB on this connection.
        raw.send("PUB legacy.rpc my.inbox 4\r\nping\r\n");
        raw.next_msg()
    });
    let d = next(&mut svc).await;
    assert_eq!(
        d.message().headers.reply_to.as_ref().map(|t| t.as_str()),
        Some("my.inbox")
    );
    d.reply("pong").await.unwrap();
    let (subject, _, payload) = requester.await.unwrap();
    assert_eq!((subject.as_str(), &payload[..]), ("my.inbox", &b"pong"[..]));
}

#[tokio::test]
async fn busway_framing_reaches_raw_subscribers_as_hmsg_and_decodes_foreign_payloads() {
    let Some(server) = NatsServer::start("headers_interop") else {
        return;
    };
    let port = server.port();
    let bus = connect(&server.url(), "hdr", Mode::Broadcast, "")
        .await
        .unwrap();
    // A plain PUB without headers still decodes on a `framing = "busway"` bus.
    let mut sub = bus
        .subscribe(pattern("legacy.>"), SubscribeOptions::new())
        .await
        .unwrap();
    RawClient::send_once(port, "PUB legacy.a 2\r\nhi\r\n").await;
    let d = next(&mut sub).await;
    assert_eq!(
        (&d.message().payload[..], d.message().headers.is_empty()),
        (&b"hi"[..], true)
    );
}

#[tokio::test]
async fn core_subscriptions_resume_after_a_server_restart() {
    let Some(mut server) = NatsServer::start("core_restart") else {
        return;
    };
    let bus = connect(&server.url(), "md", Mode::Broadcast, "")
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(pattern("r.*"), SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(Message::new(topic("r.before"), "1"))
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.message().topic.as_str(), "r.before");

    server.kill();
    wait_until("the bus to notice the outage", || {
        bus.stats().connections == 0
    })
    .await;
    assert_eq!(bus.stats().health, busway::Health::Connecting);
    server.restart();
    wait_until("the bus to reconnect", || bus.stats().connections == 1).await;
    assert!(bus.stats().reconnects >= 1);
    // Publish until one arrives: the resubscription races the first publishes.
    let start = std::time::Instant::now();
    loop {
        bus.publish(Message::new(topic("r.after"), "2"))
            .await
            .unwrap();
        if let Ok(Some(d)) = sub.recv_timeout(Duration::from_millis(200)).await {
            assert_eq!(d.message().topic.as_str(), "r.after");
            break;
        }
        assert!(start.elapsed() < WAIT, "no delivery after the restart");
    }
}

#[tokio::test]
async fn on_disconnect_fail_errors_at_once_and_buffer_delivers_after_reconnect() {
    let Some(mut server) = NatsServer::start("on_disconnect") else {
        return;
    };
    let failing = connect(
        &server.url(),
        "strict",
        Mode::Broadcast,
        "on_disconnect = \"fail\"",
    )
    .await
    .unwrap();
    let buffering = connect(&server.url(), "lenient", Mode::Broadcast, "")
        .await
        .unwrap();
    let mut sub = buffering
        .subscribe(pattern("o.*"), SubscribeOptions::new())
        .await
        .unwrap();

    server.kill();
    wait_until("both buses to notice", || {
        failing.stats().connections == 0 && buffering.stats().connections == 0
    })
    .await;
    let err = failing
        .publish(Message::new(topic("o.x"), "1"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.to_string().contains("\"strict\""), "{err}");
    assert!(failing.stats().errors >= 1);

    buffering
        .publish(Message::new(topic("o.buffered"), "kept"))
        .await
        .unwrap();
    server.restart();
    let d = next(&mut sub).await;
    assert_eq!(d.message().topic.as_str(), "o.buffered");
}

#[tokio::test]
async fn token_server_refuses_without_the_token_and_works_with_it() {
    let options = NatsServerOptions {
        token: Some("s3cr3t-t0ken".into()),
        ..Default::default()
    };
    let Some(server) = NatsServer::start_with("token_auth", options) else {
        return;
    };
    let start = std::time::Instant::now();
    let err = connect(&server.url(), "md", Mode::Broadcast, "")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.to_string().contains("\"md\""), "{err}");
    assert!(start.elapsed() < WAIT, "auth failure must be fast");

    let err = connect(&server.url(), "md", Mode::Broadcast, "token = \"wrong\"")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(!format!("{err} {err:?}").contains("wrong"), "{err:?}");

    let bus = connect(
        &server.url(),
        "md",
        Mode::Broadcast,
        "token = \"s3cr3t-t0ken\"",
    )
    .await
    .unwrap();
    let mut sub = bus
        .subscribe(pattern("a.b"), SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(Message::new(topic("a.b"), "ok")).await.unwrap();
    assert_eq!(&next(&mut sub).await.message().payload[..], b"ok");
    assert!(!format!("{bus:?}").contains("s3cr3t"), "{bus:?}");

    // The token in the URL works too, and is never printed.
    let url = server.url().replace("nats://", "nats://s3cr3t-t0ken@");
    let bus = connect(&url, "md2", Mode::Broadcast, "").await.unwrap();
    assert!(!format!("{bus:?}").contains("s3cr3t"), "{bus:?}");
}

#[tokio::test]
async fn user_password_server() {
    let options = NatsServerOptions {
        user_password: Some(("alice".into(), "pa55word".into())),
        ..Default::default()
    };
    let Some(server) = NatsServer::start_with("user_password", options) else {
        return;
    };
    let err = connect(
        &server.url(),
        "md",
        Mode::Broadcast,
        "user = \"alice\"\npassword = \"nope\"",
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    connect(
        &server.url(),
        "md",
        Mode::Broadcast,
        "user = \"alice\"\npassword = \"pa55word\"",
    )
    .await
    .unwrap();
}

/// The NATS subscriptions the server holds for `subject` (from `/connz?subs=1`; the server
/// writes `>` as `\u003e` in JSON, so use subjects without it).
fn nats_subscriptions(server: &NatsServer, subject: &str) -> usize {
    server
        .monitor("/connz?subs=1")
        .matches(&format!("\"{subject}\""))
        .count()
}

async fn payloads(sub: &mut busway::Subscription, n: usize) -> Vec<String> {
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        got.push(String::from_utf8_lossy(&next(sub).await.message().payload).into_owned());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_subscriptions_of_one_pattern_share_one_nats_subscription() {
    let Some(mut server) = NatsServer::start("shared_sub") else {
        return;
    };
    let bus = connect(&server.url(), "md", Mode::Broadcast, "")
        .await
        .unwrap();
    let opts = |overflow| SubscribeOptions::new().capacity(1_000).overflow(overflow);
    let mut a = bus
        .subscribe(pattern("share.*"), opts(Overflow::DropNewest))
        .await
        .unwrap();
    bus.publish(Message::new(topic("share.x"), "before"))
        .await
        .unwrap();
    bus.flush().await.unwrap();
    let mut b = bus
        .subscribe(pattern("share.*"), opts(Overflow::DropOldest))
        .await
        .unwrap();
    let mut c = bus
        .subscribe(pattern("share.*"), opts(Overflow::Latest))
        .await
        .unwrap();
    assert_eq!(nats_subscriptions(&server, "share.*"), 1, "one NATS SUB");
    // `block` and groups keep their own.
    let blocking = bus
        .subscribe(pattern("share.*"), opts(Overflow::Block))
        .await
        .unwrap();
    let grouped = bus
        .subscribe(pattern("share.*"), opts(Overflow::DropNewest).group("g"))
        .await
        .unwrap();
    assert_eq!(nats_subscriptions(&server, "share.*"), 3);
    drop((blocking, grouped));
    wait_until("their UNSUBs", || {
        nats_subscriptions(&server, "share.*") == 1
    })
    .await;

    let n = 200;
    for i in 0..n {
        bus.publish(Message::new(topic("share.x"), format!("{i}")))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    let want: Vec<String> = std::iter::once("before".to_string())
        .chain((0..n).map(|i| i.to_string()))
        .collect();
    assert_eq!(payloads(&mut a, n + 1).await, want);
    // Joined after "before" was published and flushed: it starts with the next one.
    assert_eq!(payloads(&mut b, n).await, want[1..]);
    // `latest` keeps the newest of its one topic.
    wait_until("c to hold the last", || c.stats().dropped == n as u64 - 1).await;
    assert_eq!(payloads(&mut c, 1).await, [(n - 1).to_string()]);
    // Each counts its own drops.
    let dropped = |s: &busway::Subscription| s.stats().dropped;
    assert_eq!(
        (dropped(&a), dropped(&b), dropped(&c)),
        (0, 0, n as u64 - 1)
    );

    // One member leaving leaves the others receiving, on the same NATS SUB.
    drop(a);
    bus.publish(Message::new(topic("share.y"), "after a"))
        .await
        .unwrap();
    assert_eq!(payloads(&mut b, 1).await, ["after a"]);
    assert_eq!(payloads(&mut c, 1).await, ["after a"]);
    assert_eq!(nats_subscriptions(&server, "share.*"), 1);

    // The shared subscription is resubscribed after a restart.
    server.kill();
    wait_until("the bus to notice the outage", || {
        bus.stats().connections == 0
    })
    .await;
    server.restart();
    wait_until("the bus to reconnect", || bus.stats().connections == 1).await;
    let start = std::time::Instant::now();
    loop {
        bus.publish(Message::new(topic("share.z"), "after restart"))
            .await
            .unwrap();
        if let Ok(Some(d)) = b.recv_timeout(Duration::from_millis(200)).await {
            assert_eq!(d.message().topic.as_str(), "share.z");
            break;
        }
        assert!(start.elapsed() < WAIT, "no delivery after the restart");
    }
    assert_eq!(payloads(&mut c, 1).await, ["after restart"]);
    assert_eq!(nats_subscriptions(&server, "share.*"), 1);

    // The last one out unsubscribes from the server.
    drop((b, c));
    wait_until("the UNSUB", || nats_subscriptions(&server, "share.*") == 0).await;
    // A new subscription of the pattern starts a new one.
    let mut d = bus
        .subscribe(pattern("share.*"), opts(Overflow::DropNewest))
        .await
        .unwrap();
    assert_eq!(nats_subscriptions(&server, "share.*"), 1);
    bus.publish(Message::new(topic("share.x"), "again"))
        .await
        .unwrap();
    assert_eq!(payloads(&mut d, 1).await, ["again"]);
    bus.close().await.unwrap();
    assert!(d.next().await.is_none(), "close ends a shared member");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_subscribes_of_one_pattern_end_up_on_one_nats_subscription() {
    let Some(server) = NatsServer::start("shared_race") else {
        return;
    };
    let bus = std::sync::Arc::new(
        connect(&server.url(), "md", Mode::Broadcast, "")
            .await
            .unwrap(),
    );
    // Subscribed all at once: several find no shared subscription, each makes one, and all
    // but the first to register drop theirs and join it.
    let subs = futures::future::join_all((0..16).map(|_| {
        let bus = bus.clone();
        async move {
            bus.subscribe(
                pattern("race.*"),
                SubscribeOptions::new().overflow(Overflow::DropOldest),
            )
            .await
            .unwrap()
        }
    }))
    .await;
    wait_until("the losers' UNSUBs", || {
        nats_subscriptions(&server, "race.*") == 1
    })
    .await;
    bus.publish(Message::new(topic("race.a"), "x"))
        .await
        .unwrap();
    for mut sub in subs {
        assert_eq!(payloads(&mut sub, 1).await, ["x"]);
    }
    // All dropped at the end of the loop: the shared subscription goes with the last.
    wait_until("the UNSUB", || nats_subscriptions(&server, "race.*") == 0).await;
}

#[tokio::test]
async fn dropping_policy_counts_every_drop() {
    let Some(server) = NatsServer::start("drop_newest") else {
        return;
    };
    let bus = connect(&server.url(), "md", Mode::Broadcast, "")
        .await
        .unwrap();
    let opts = SubscribeOptions::new()
        .capacity(10)
        .overflow(Overflow::DropNewest);
    let mut sub = bus.subscribe(pattern("p.*"), opts).await.unwrap();
    let n = 1000;
    for i in 0..n {
        bus.publish(Message::new(topic("p.x"), format!("{i}")))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    wait_until("every message delivered or dropped", || {
        sub.pending() as u64 + bus.stats().dropped == n
    })
    .await;
    let mut got = 0;
    while let Ok(Some(_)) = sub.recv_timeout(Duration::from_millis(200)).await {
        got += 1;
    }
    assert_eq!(got, 10);
    assert_eq!(sub.stats().dropped + got, n);
}

#[tokio::test]
async fn client_side_slow_consumer_drops_are_counted_exactly() {
    let Some(server) = NatsServer::start("slow_consumer") else {
        return;
    };
    // A tiny async-nats channel behind a small blocking queue and a reader that does not read:
    // what does not fit is dropped inside async-nats. Far more drops than async-nats's
    // 128-deep event channel can report, so only the exact count can add up.
    let bus = connect(&server.url(), "md", Mode::Broadcast, "client_capacity = 16")
        .await
        .unwrap();
    let publisher = connect(&server.url(), "pub", Mode::Broadcast, "")
        .await
        .unwrap();
    let opts = SubscribeOptions::new()
        .capacity(8)
        .overflow(Overflow::Block);
    let mut sub = bus.subscribe(pattern("s.*"), opts).await.unwrap();
    let n = 5000u64;
    for i in 0..n {
        publisher
            .publish(Message::new(topic("s.x"), format!("{i}")))
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    // Everything reached the subscriber's connection before it starts reading.
    bus.flush().await.unwrap();
    wait_until("async-nats drops to be seen", || bus.stats().dropped > 0).await;
    let mut got = 0u64;
    while let Ok(Some(_)) = sub.recv_timeout(Duration::from_millis(500)).await {
        got += 1;
    }
    bus.flush().await.unwrap();
    let dropped = bus.stats().dropped;
    assert!(got >= 8, "got {got}");
    assert_eq!(got + dropped, n, "got {got}, dropped {dropped}");
    // The only subscription on the bus: the drops are its own.
    assert_eq!(sub.stats().dropped, dropped);

    // Without a flush, the count settles by itself shortly after traffic pauses.
    for i in 0..n {
        publisher
            .publish(Message::new(topic("s.y"), format!("{i}")))
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let mut again = 0u64;
    while let Ok(Some(_)) = sub.recv_timeout(Duration::from_millis(500)).await {
        again += 1;
    }
    wait_until("the second round to settle", || {
        got + again + bus.stats().dropped == 2 * n
    })
    .await;
}

#[tokio::test]
async fn bad_config_is_named() {
    let Some(server) = NatsServer::start("bad_config") else {
        return;
    };
    let err = connect(&server.url(), "md", Mode::Broadcast, "framing = \"json\"")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().starts_with("test.toml: buses.md"), "{err}");
    let err = connect(&server.url(), "md", Mode::Broadcast, "user = \"x\"")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("buses.md.password"), "{err}");
    let err = connect(
        "nats://127.0.0.1:1",
        "md",
        Mode::Broadcast,
        "connect_timeout = \"1s\"",
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
}
