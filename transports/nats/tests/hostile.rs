//! A hostile or careless foreign publisher speaking raw NATS: `HPUB` with a header block
//! async-nats cannot parse. async-nats treats it as a protocol error and drops the whole
//! connection, so what the server had already written behind it is lost (core NATS) or
//! redelivered after the ack wait (JetStream). These tests measure that cost and check what
//! busway guarantees: the drop is counted and logged, the bus reconnects and later messages
//! arrive.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use busway::{Bus, Mode, SubscribeOptions, Subscription};
use busway_testkit::nats::NatsServer;
use common::{connect, pattern, WAIT};

/// Malformed header blocks, each as a foreign client would write it after `HPUB`, and
/// whether async-nats drops the connection on it. The server relays all of them unchanged.
const MALFORMED: &[(&str, &[u8], bool)] = &[
    ("no colon", b"NATS/1.0\r\nnocolon\r\n\r\n", true),
    ("HTTP status line", b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n", true),
    (
        "non-ASCII name",
        "NATS/1.0\r\nnäme: v\r\n\r\n".as_bytes(),
        true,
    ),
    ("not UTF-8", b"NATS/1.0\r\nA: \xff\xfe\r\n\r\n", true),
    ("bad status", b"NATS/1.0 abc\r\n\r\n", true),
    // Parsed line by line without checking the final blank line: it decodes.
    ("truncated block", b"NATS/1.0\r\nA: b", false),
];

/// A raw NATS client on a plain TCP socket: no client library between the test and the
/// server, so it can write what no library would.
struct RawPublisher {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl RawPublisher {
    fn connect(port: u16) -> RawPublisher {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut info = String::new();
        reader.read_line(&mut info).unwrap();
        assert!(info.starts_with("INFO "), "{info}");
        let mut raw = RawPublisher { stream, reader };
        raw.send(b"CONNECT {\"verbose\":false,\"headers\":true}\r\n");
        raw.sync();
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// `HPUB` of `headers` (taken as is) and `payload` on `subject`.
    fn hpub(&mut self, subject: &str, headers: &[u8], payload: &[u8]) {
        let mut frame = format!(
            "HPUB {subject} {} {}\r\n",
            headers.len(),
            headers.len() + payload.len()
        )
        .into_bytes();
        frame.extend_from_slice(headers);
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.send(&frame);
    }

    fn publish(&mut self, subject: &str, payload: &[u8]) {
        let mut frame = format!("PUB {subject} {}\r\n", payload.len()).into_bytes();
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.send(&frame);
    }

    /// PING and wait for the PONG: the server has processed (and routed) everything sent
    /// before. Fails on `-ERR` (the server refused a frame).
    fn sync(&mut self) {
        self.send(b"PING\r\n");
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            assert!(!line.starts_with("-ERR"), "server refused: {line}");
            if line.starts_with("PONG") {
                return;
            }
        }
    }
}

/// The payloads `sub` receives within `wait`.
async fn collect(sub: &mut Subscription, wait: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let end = Instant::now() + wait;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match sub.recv_timeout(left).await {
            Ok(Some(d)) => {
                got.push(String::from_utf8_lossy(&d.message().payload).into_owned());
                let _ = d.ack().await;
            }
            _ => break,
        }
    }
    got
}

/// Publishes `probe-<n>` every 100 ms until one arrives: the bus is subscribed again.
/// Returns how long that took.
async fn wait_for_recovery(
    raw: &mut RawPublisher,
    sub: &mut Subscription,
    subject: &str,
) -> Duration {
    let start = Instant::now();
    for n in 0.. {
        assert!(start.elapsed() < WAIT, "the bus did not recover");
        raw.publish(subject, format!("probe-{n}").as_bytes());
        raw.sync();
        if let Ok(Some(d)) = sub.recv_timeout(Duration::from_millis(100)).await {
            let _ = d.ack().await;
            return start.elapsed();
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_malformed_header_block_drops_the_connection_and_is_counted() {
    let Some(server) = NatsServer::start("nats_hostile_core") else {
        return;
    };
    let logs = busway_testkit::logs::capture();
    let bus = connect(&server.url(), "md", Mode::Broadcast, "")
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(pattern("h.>"), SubscribeOptions::new())
        .await
        .unwrap();
    let mut raw = RawPublisher::connect(server.port());

    // A well-formed header block costs nothing.
    raw.hpub("h.ok", b"NATS/1.0\r\nA: b\r\n\r\n", b"fine");
    raw.publish("h.good", b"good");
    raw.sync();
    assert_eq!(
        collect(&mut sub, Duration::from_millis(500)).await,
        ["fine", "good"]
    );
    assert_eq!(bus.stats().reconnects, 0);

    const ROUNDS: usize = 4;
    let mut expected_drops = 0;
    for &(name, headers, drops) in MALFORMED {
        let mut lost = 0;
        for round in 0..ROUNDS {
            let before = bus.stats();
            raw.hpub("h.bad", headers, b"bad");
            let good = format!("good-{round}");
            raw.publish("h.good", good.as_bytes());
            raw.sync();
            let recovery = wait_for_recovery(&mut raw, &mut sub, "h.probe").await;
            let got = collect(&mut sub, Duration::from_millis(200)).await;
            let after = bus.stats();
            // `got` also holds probes the bus received after the one that ended the wait.
            if !got.contains(&good) {
                lost += 1;
            }
            let drop = u64::from(drops);
            assert_eq!(
                after.reconnects,
                before.reconnects + drop,
                "{name}: reconnects"
            );
            assert_eq!(after.errors, before.errors + drop, "{name}: errors");
            println!(
                "core {name:>16} round {round}: recovered in {recovery:?}, good {}",
                if got.contains(&good) {
                    "arrived"
                } else {
                    "lost"
                }
            );
            expected_drops += drop;
        }
        println!("core {name:>16}: {lost}/{ROUNDS} good messages lost");
        if !drops {
            assert_eq!(lost, 0, "{name}");
        }
    }
    let stats = bus.stats();
    assert_eq!(stats.reconnects, expected_drops);
    let warned = logs
        .text()
        .lines()
        .filter(|l| {
            l.contains("WARN") && l.contains("NATS connection lost") && l.contains("bus=\"md\"")
        })
        .count();
    assert!(
        warned as u64 >= expected_drops,
        "{warned} warnings for {expected_drops} drops"
    );
}

/// JetStream stores the malformed message and redelivers it after every ack wait (busway's
/// consumers never give up on the server side: `max_deliver = -1`), so it drops the
/// connection again each time. The good message behind it is redelivered and arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_malformed_header_block_is_redelivered_and_drops_the_connection_each_time() {
    let Some(server) = NatsServer::start("nats_hostile_js") else {
        return;
    };
    let logs = busway_testkit::logs::capture();
    let bus = connect(&server.url(), "eng", Mode::Stream, "subjects = [\"jh.>\"]")
        .await
        .unwrap();
    let mut raw = RawPublisher::connect(server.port());
    for (i, &(name, headers, drops)) in MALFORMED.iter().enumerate() {
        // A consumer of its own per variant: an earlier variant's message is redelivered
        // for ever to the earlier one, which is gone once its subscription drops.
        let opts = SubscribeOptions::new()
            .group(format!("g{i}"))
            .ack_timeout(Duration::from_secs(1));
        let mut sub = bus
            .subscribe(pattern(&format!("jh.v{i}.>")), opts)
            .await
            .unwrap();
        let before = bus.stats();
        raw.hpub(&format!("jh.v{i}.bad"), headers, b"bad");
        raw.publish(&format!("jh.v{i}.good"), b"good");
        raw.sync();
        let start = Instant::now();
        let got = collect(&mut sub, Duration::from_secs(5)).await;
        let after = bus.stats();
        let drops_seen = after.reconnects - before.reconnects;
        println!(
            "jetstream {name:>16}: got {got:?} in {:?}, reconnects +{drops_seen}, errors +{}",
            start.elapsed(),
            after.errors - before.errors
        );
        assert!(
            got.contains(&"good".to_string()),
            "{name}: good message lost"
        );
        if drops {
            // Once at the first delivery and again after (almost) every 1 s ack wait.
            assert!(drops_seen >= 2, "{name}: {drops_seen} drops");
            assert!(after.errors - before.errors >= drops_seen, "{name}");
            assert!(!got.contains(&"bad".to_string()), "{name}");
        } else {
            assert_eq!(drops_seen, 0, "{name}");
        }
        drop(sub);
    }
    assert!(logs.text().contains("bus=\"eng\""));
}
