//! Memory held for subscriptions stays bounded by configuration whatever a remote peer sends:
//! a subscriber that never reads, flooded by a raw client, does not grow the process.
//!
//! Its own test binary (and nextest runs each test in its own process), so the RSS measured
//! is this flood's alone.

mod common;

use std::time::{Duration, Instant};

use busway::{Bus, Mode, Overflow, SubscribeOptions};
use busway_redis::Framing;
use busway_testkit::redis::server_args;
use busway_testkit::{broker_binary, free_port, ServerProcess};
use common::{connect, pat, topic, wait_for, WAIT};

/// The subscription's queue capacity.
const CAPACITY: usize = 1024;
/// Flooded payload size.
const SIZE: usize = 1024;
/// What the process may grow by beyond what the configuration holds (the queue, 128 pushes
/// between the connection and dispatch, one frame being read): the allocator's arenas, the
/// flooding client's pipelines, the runtimes. Unbounded, the same flood grew the process by
/// 37 to 135 MiB.
const SLACK: u64 = 16 << 20;

/// The process's resident set, in bytes.
fn rss() -> u64 {
    busway_testkit::faults::rss_kib().expect("VmRSS in /proc/self/status") * 1024
}

/// A private `redis-server` whose pub/sub output buffer limit is `pubsub 32mb 8mb 10`.
fn server(test: &str) -> Option<(ServerProcess, String)> {
    server_with(test, "pubsub 32mb 8mb 10")
}

/// A private `redis-server` with this `client-output-buffer-limit`.
fn server_with(test: &str, output_limit: &str) -> Option<(ServerProcess, String)> {
    let binary = broker_binary("redis-server", test)?;
    let port = free_port();
    let args = server_args(port, &["--client-output-buffer-limit", output_limit]);
    let process = ServerProcess::start(&binary, args, port);
    Some((process, format!("redis://127.0.0.1:{port}")))
}

/// A plain redis-rs connection: the remote peer, not busway.
async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `n` PUBLISHes of `SIZE` bytes on `channel`, pipelined 500 at a time.
async fn flood_publish(url: &str, channel: &str, n: usize) {
    let mut con = raw(url).await;
    let payload = vec![b'x'; SIZE];
    let mut left = n;
    while left > 0 {
        let k = left.min(500);
        let mut pipe = redis::pipe();
        for _ in 0..k {
            pipe.cmd("PUBLISH").arg(channel).arg(&payload).ignore();
        }
        let () = pipe.query_async(&mut con).await.unwrap();
        left -= k;
    }
}

/// The growth the configuration allows: the queue and the push buffer full of `SIZE`-byte
/// messages, plus slack.
fn bound() -> u64 {
    ((CAPACITY + 128) * SIZE) as u64 + SLACK
}

async fn broadcast_flood(test: &str, overflow: Overflow) {
    let Some((_server, url)) = server(test) else {
        return;
    };
    let bus = connect("flood", &url, Mode::Broadcast, |c| c.framing = Framing::Raw).await;
    let mut sub = bus
        .subscribe(
            pat("flood.t"),
            SubscribeOptions::new()
                .capacity(CAPACITY)
                .overflow(overflow),
        )
        .await
        .unwrap();
    let before = rss();
    let start = Instant::now();
    flood_publish(&url, "flood.t", 100_000).await;
    // What the connection still had in its socket reaches the process after the flood.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss();
    let grown = after.saturating_sub(before);
    let stats = bus.stats();
    eprintln!(
        "{test}: RSS {} KiB -> {} KiB (+{} KiB) in {:?}; bound +{} KiB; stats {stats:?}",
        before / 1024,
        after / 1024,
        grown / 1024,
        start.elapsed(),
        bound() / 1024
    );
    assert!(
        grown < bound(),
        "RSS grew {} KiB, more than the {} KiB the configuration allows",
        grown / 1024,
        bound() / 1024
    );
    if overflow == Overflow::DropNewest {
        // What dispatch took beyond the queue is dropped and counted (a dispatch slower
        // than the flood may also be disconnected by the server: counted in reconnects).
        wait_for("the drops to be counted", || bus.stats().dropped > 0).await;
    }
    // The flood is over: the subscriber reads again and gets new messages. Under `block`
    // the server disconnected it on the way (its output buffer limit): counted, and the
    // connection came back resubscribed.
    let mut con = raw(&url).await;
    let deadline = Instant::now() + WAIT * 3;
    loop {
        assert!(Instant::now() < deadline, "no message after the flood");
        let () = redis::cmd("PUBLISH")
            .arg("flood.t")
            .arg("after")
            .query_async(&mut con)
            .await
            .unwrap();
        let mut seen = false;
        while let Ok(Some(d)) = sub.recv_timeout(Duration::from_millis(50)).await {
            if &d.message().payload[..] == b"after" {
                seen = true;
            }
        }
        if seen {
            break;
        }
    }
    if overflow == Overflow::Block {
        let stats = bus.stats();
        assert!(
            stats.reconnects >= 1,
            "the disconnection is counted: {stats:?}"
        );
    }
}

/// A `block` subscriber that never reads: backpressure reaches the socket, the server's
/// `client-output-buffer-limit pubsub` disconnects it, busway counts that and resubscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_block_subscriber_that_never_reads_stays_bounded() {
    broadcast_flood(
        "broadcast_block_subscriber_that_never_reads_stays_bounded",
        Overflow::Block,
    )
    .await;
}

/// A `drop_newest` subscriber that never reads: bounded, the drops counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_drop_newest_subscriber_that_never_reads_stays_bounded() {
    broadcast_flood(
        "broadcast_drop_newest_subscriber_that_never_reads_stays_bounded",
        Overflow::DropNewest,
    )
    .await;
}

/// A `block` group subscriber that never reads, flooded with XADDs: the reader takes no
/// more than the queue can hold; the rest stays in Redis and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_group_subscriber_that_never_reads_stays_bounded() {
    stream_flood(
        "stream_group_subscriber_that_never_reads_stays_bounded",
        Overflow::Block,
    )
    .await;
}

/// The same under `drop_newest`: the reader reads only what the queue has room for, so
/// nothing is read to be dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_drop_newest_group_subscriber_reads_only_what_its_queue_takes() {
    stream_flood(
        "stream_drop_newest_group_subscriber_reads_only_what_its_queue_takes",
        Overflow::DropNewest,
    )
    .await;
}

async fn stream_flood(test: &str, overflow: Overflow) {
    let Some((_server, url)) = server(test) else {
        return;
    };
    const N: usize = 50_000;
    let bus = connect("flood", &url, Mode::Stream, |_| {}).await;
    let mut sub = bus
        .subscribe(
            pat("flood.s"),
            SubscribeOptions::new()
                .group("g")
                .capacity(CAPACITY)
                .overflow(overflow),
        )
        .await
        .unwrap();
    let before = rss();
    let mut con = raw(&url).await;
    let payload = vec![b'x'; SIZE];
    let mut left = N;
    while left > 0 {
        let k = left.min(500);
        let mut pipe = redis::pipe();
        for _ in 0..k {
            pipe.cmd("XADD")
                .arg("busway:stream:flood.s")
                .arg("*")
                .arg("payload")
                .arg(&payload)
                .ignore();
        }
        let () = pipe.query_async(&mut con).await.unwrap();
        left -= k;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss();
    let grown = after.saturating_sub(before);
    let len: usize = redis::cmd("XLEN")
        .arg("busway:stream:flood.s")
        .query_async(&mut con)
        .await
        .unwrap();
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg("busway:stream:flood.s")
        .arg("g")
        .query_async(&mut con)
        .await
        .unwrap();
    let pending = match pending {
        redis::Value::Array(v) => match v.first() {
            Some(redis::Value::Int(n)) => *n as usize,
            _ => panic!("XPENDING {v:?}"),
        },
        v => panic!("XPENDING {v:?}"),
    };
    eprintln!(
        "{test}: RSS {} KiB -> {} KiB (+{} KiB); XLEN {len}, pending {pending}; bound +{} KiB; stats {:?}",
        before / 1024,
        after / 1024,
        grown / 1024,
        bound() / 1024,
        bus.stats()
    );
    assert!(grown < bound(), "RSS grew {} KiB", grown / 1024);
    assert_eq!(len, N, "every entry stays in the stream");
    assert!(
        pending <= CAPACITY,
        "the reader read {pending} entries for a queue of {CAPACITY}"
    );
    // Nothing is lost: every entry is delivered once the subscriber reads.
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < N {
        assert!(Instant::now() < deadline, "only {got} of {N} delivered");
        let mut batch = Vec::new();
        let n = tokio::time::timeout(WAIT, sub.recv_many(&mut batch, 512))
            .await
            .unwrap_or(0);
        assert!(n > 0, "only {got} of {N} delivered");
        assert!(batch.iter().all(|d| d.message().topic == topic("flood.s")));
        got += batch.len();
        busway::Delivery::ack_all(&batch).await.unwrap();
    }
    assert_eq!(got, N);
    assert_eq!(bus.stats().dropped, 0);
}

/// A 70 MB PUBLISH from a foreign client: the server's pub/sub output limit (32 MB, Redis's
/// default) disconnects the subscriber before busway reads it all; busway counts the
/// reconnect, resubscribes, delivers the next message, and keeps none of the frame's memory.
/// (With the limit off, the client's read buffer would keep the largest frame's size: see
/// RELIABILITY.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_giant_foreign_frame_costs_a_resubscribe_not_memory() {
    let test = "a_giant_foreign_frame_costs_a_resubscribe_not_memory";
    let Some((_server, url)) = server(test) else {
        return;
    };
    const GIANT: usize = 70 << 20;
    let bus = connect("giant", &url, Mode::Broadcast, |c| c.framing = Framing::Raw).await;
    let mut sub = bus
        .subscribe(pat("giant.t"), SubscribeOptions::new())
        .await
        .unwrap();
    // The foreign client is another process (redis-cli), so this process's memory is
    // busway's alone.
    let Some(cli) = broker_binary("redis-cli", test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("giant");
    std::fs::write(&file, vec![b'x'; GIANT]).unwrap();
    let port = url.rsplit(':').next().unwrap().to_string();
    let before = rss();
    let status = std::process::Command::new(cli)
        .args(["-p", &port, "-x", "PUBLISH", "giant.t"])
        .stdin(std::fs::File::open(&file).unwrap())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("the disconnection to be counted", || {
        bus.stats().reconnects >= 1
    })
    .await;
    let mut con = raw(&url).await;
    let deadline = Instant::now() + WAIT;
    let delivered = loop {
        assert!(
            Instant::now() < deadline,
            "no message after the giant frame"
        );
        let () = redis::cmd("PUBLISH")
            .arg("giant.t")
            .arg("after")
            .query_async(&mut con)
            .await
            .unwrap();
        if let Ok(Some(d)) = sub.recv_timeout(Duration::from_millis(100)).await {
            break d;
        }
    };
    assert_eq!(
        &delivered.message().payload[..],
        b"after",
        "the giant frame never arrives"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss();
    eprintln!(
        "{test}: RSS {} KiB -> {} KiB; stats {:?}",
        before / 1024,
        after / 1024,
        bus.stats()
    );
    assert!(
        after < before + SLACK,
        "the process keeps the giant frame: RSS {} KiB -> {} KiB",
        before / 1024,
        after / 1024
    );
}
