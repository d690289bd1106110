//! Fault tests against real redis-server processes started per test (never the shared one):
//! kill -9 and restart under load, a hung (SIGSTOPped) server, slow consumers, and `close`
//! flushing what was accepted. Each prints `RESULT ...` lines copied into RELIABILITY.md.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busway::{Bus, Message, Mode, Overflow, SubscribeOptions};
use busway_redis::{RedisBus, RedisConfig};
use busway_testkit::faults::{
    check_hung_error, publish_then_close, restart_under_load, slow_consumer_with_dropping_policy,
    wait_until, within, Guarantee, LoadPlan,
};
use busway_testkit::redis::RedisServer;
use futures::StreamExt;

use common::{connect, pat, topic, WAIT};

async fn bus(url: &str, mode: Mode, f: impl FnOnce(&mut RedisConfig)) -> RedisBus {
    connect("faults", url, mode, f).await
}

// ---------------------------------------------------------------------------------------
// 1. Broker restart under load
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_restart_under_load_reconnects_and_counts_losses() {
    let Some(server) = RedisServer::start("faults_broadcast_restart") else {
        return;
    };
    within("broadcast restart under load", async {
        let bus = Arc::new(bus(&server.url(), Mode::Broadcast, |_| {}).await);
        // Block + a queue larger than the run: nothing is dropped in the process, so every
        // loss counted below happened at the broker / connection.
        let sub = bus
            .subscribe(
                pat("load.>"),
                SubscribeOptions::new()
                    .capacity(20_000)
                    .overflow(Overflow::Block),
            )
            .await
            .unwrap();
        let (report, _server) = restart_under_load(
            "redis-broadcast",
            bus.clone(),
            sub,
            server,
            LoadPlan::default(),
            Guarantee::AtMostOnce,
        )
        .await;
        println!("{}", bus.stats());
        report.check(Guarantee::AtMostOnce);
        // Held publishes wait for the bus's own subscriptions to be back, so a restart costs
        // this subscriber at most what the kill caught on the server's sockets (before: 60-110
        // per restart, the held publishes resent before the resubscription).
        assert!(
            report.lost <= 10,
            "the bus's own subscriber lost {} across 2 restarts",
            report.lost
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_restart_under_load_delivers_every_ok_publish() {
    let Some(server) = RedisServer::start_with_aof("faults_stream_restart") else {
        return;
    };
    within("stream restart under load", async {
        let bus = Arc::new(bus(&server.url(), Mode::Stream, |_| {}).await);
        // A short ack timeout: entries read by XREADGROUP just before a kill (in the group's
        // pending list, answer lost) are reclaimed and delivered again within seconds.
        let sub = bus
            .subscribe(
                pat("load.orders"),
                SubscribeOptions::new()
                    .group("faults")
                    .capacity(20_000)
                    .ack_timeout(Duration::from_secs(10)),
            )
            .await
            .unwrap();
        let (report, _server) = restart_under_load(
            "redis-stream",
            bus.clone(),
            sub,
            server,
            LoadPlan::default(),
            Guarantee::AtLeastOnce,
        )
        .await;
        println!("{}", bus.stats());
        report.check(Guarantee::AtLeastOnce);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. Hung broker (SIGSTOP)
// ---------------------------------------------------------------------------------------

const SHORT: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_broker_times_out_clearly_and_resumes() {
    let Some(server) = RedisServer::start("faults_hung") else {
        return;
    };
    within("hung broker", async {
        let short = |c: &mut RedisConfig| c.publish_timeout = SHORT;
        let stream = bus(&server.url(), Mode::Stream, short).await;
        let broadcast = bus(&server.url(), Mode::Broadcast, short).await;
        let mut bsub = broadcast
            .subscribe(pat("hung.b"), SubscribeOptions::new())
            .await
            .unwrap();
        let mut ssub = stream
            .subscribe(pat("hung.s"), SubscribeOptions::new().group("g"))
            .await
            .unwrap();
        broadcast
            .publish(Message::new(topic("hung.b"), "before"))
            .await
            .unwrap();
        bsub.recv_timeout(WAIT).await.unwrap().expect("a delivery");

        server.pause();

        let t = Instant::now();
        let err = stream
            .publish(Message::new(topic("hung.s"), "frozen"))
            .await
            .expect_err("a stream publish to a frozen server must fail");
        check_hung_error(
            "redis",
            "stream_publish",
            "faults",
            &err,
            t.elapsed(),
            SHORT,
        );

        // Broadcast publishes are accepted into the writer's queue; flush reports the hang.
        broadcast
            .publish(Message::new(topic("hung.b"), "queued"))
            .await
            .unwrap();
        let t = Instant::now();
        let err = broadcast
            .flush()
            .await
            .expect_err("flush to a frozen server");
        check_hung_error(
            "redis",
            "broadcast_flush",
            "faults",
            &err,
            t.elapsed(),
            SHORT,
        );

        let t = Instant::now();
        let err = broadcast
            .request(Message::new(topic("hung.rpc"), "q"), SHORT)
            .await
            .expect_err("a request to a frozen server");
        // The inbox SUBSCRIBE and the publish each wait at most response_timeout, then
        // the reply at most the request's own timeout.
        check_hung_error("redis", "request", "faults", &err, t.elapsed(), SHORT * 3);

        server.resume();

        // Everything resumes. The message queued during the freeze is at most once: its
        // pipeline timed out, the command connection was replaced and the batch resent, but
        // the pub/sub connection may have been replaced too and resubscribed after it.
        let start = Instant::now();
        let mut queued_arrived = false;
        'resumed: loop {
            broadcast
                .publish(Message::new(topic("hung.b"), "after"))
                .await
                .unwrap();
            while let Ok(Some(d)) = bsub.recv_timeout(Duration::from_millis(300)).await {
                match &d.message().payload[..] {
                    b"queued" => queued_arrived = true,
                    b"after" => break 'resumed,
                    _ => {}
                }
            }
            assert!(start.elapsed() < WAIT, "broadcast delivery never resumed");
        }
        println!(
            "RESULT redis-hung broadcast_resumed queued_during_freeze_delivered={queued_arrived}"
        );
        let start = Instant::now();
        loop {
            match stream.publish(Message::new(topic("hung.s"), "after")).await {
                Ok(()) => break,
                Err(e) => assert!(start.elapsed() < WAIT, "stream publish never resumed: {e}"),
            }
        }
        // The frozen publish's XADD may have been applied when the server thawed (the
        // publisher was told it failed); skip it if so.
        loop {
            let d = ssub.recv_timeout(WAIT).await.unwrap().expect("a delivery");
            d.ack().await.unwrap();
            if &d.message().payload[..] == b"after" {
                break;
            }
        }
        broadcast.flush().await.unwrap();
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 3. Slow consumer
// ---------------------------------------------------------------------------------------

// The drop-policy case is shared with the other transports: `slow_consumer_with_dropping_policy`
// in busway-testkit.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_slow_consumer_with_dropping_policy_does_not_hold_back_others() {
    let Some(server) = RedisServer::start("faults_slow_drop") else {
        return;
    };
    within("slow consumer (drop)", async {
        let bus = bus(&server.url(), Mode::Broadcast, |_| {}).await;
        slow_consumer_with_dropping_policy(Arc::new(bus), "redis-broadcast").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_slow_consumer_under_block_holds_the_shared_reader_and_loses_nothing() {
    let Some(server) = RedisServer::start("faults_slow_block") else {
        return;
    };
    within("slow consumer (block)", async {
        let bus = bus(&server.url(), Mode::Broadcast, |_| {}).await;
        let n = 200;
        let capacity = 10;
        let mut fast = bus
            .subscribe(pat("blk.t"), SubscribeOptions::new().capacity(n))
            .await
            .unwrap();
        let mut slow = bus
            .subscribe(
                pat("blk.t"),
                SubscribeOptions::new()
                    .capacity(capacity)
                    .overflow(Overflow::Block),
            )
            .await
            .unwrap();
        for i in 0..n {
            bus.publish(Message::new(topic("blk.t"), i.to_string())).await.unwrap();
        }
        bus.flush().await.unwrap();
        // Documented behaviour: the pub/sub reader is shared, so while `slow` is full the
        // reader waits and `fast` stops receiving too (Redis keeps the rest in its output
        // buffer for the connection).
        wait_until("the slow queue to fill", WAIT, || slow.pending() == capacity).await;
        let mut got = 0;
        while let Ok(Some(_)) = fast.recv_timeout(Duration::from_millis(500)).await {
            got += 1;
        }
        println!("RESULT redis-broadcast slow_consumer policy=block n={n} capacity={capacity} fast_received_while_stalled={got}");
        assert!(got < n, "the shared reader waited for the blocked subscriber");
        // Once the slow one reads, everything arrives in both, nothing dropped.
        for i in 0..n {
            let d = slow.recv_timeout(WAIT).await.unwrap().expect("open");
            assert_eq!(d.message().payload, i.to_string().as_bytes());
        }
        for _ in got..n {
            fast.recv_timeout(WAIT).await.unwrap().expect("open");
        }
        assert_eq!(bus.stats().dropped, 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 4. Graceful shutdown
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_flushes_every_accepted_broadcast_publish() {
    let Some(server) = RedisServer::start("faults_close_broadcast") else {
        return;
    };
    within("close (broadcast)", async {
        // A raw subscriber on its own connection, opened before publishing.
        let client = redis::Client::open(server.url()).unwrap();
        let mut raw = client.get_async_pubsub().await.unwrap();
        raw.subscribe("close.t").await.unwrap();
        let bus = bus(&server.url(), Mode::Broadcast, |c| {
            c.framing = busway_redis::Framing::Raw;
        })
        .await;
        let ok = publish_then_close(Arc::new(bus), &topic("close.t"), 8, 5_000).await;
        let mut seen = HashSet::new();
        let mut messages = raw.on_message();
        while !ok.is_subset(&seen) {
            match tokio::time::timeout(WAIT, messages.next()).await {
                Ok(Some(m)) => {
                    seen.insert(String::from_utf8(m.get_payload_bytes().to_vec()).unwrap());
                }
                _ => break,
            }
        }
        let missing: Vec<_> = ok.difference(&seen).take(10).collect();
        println!(
            "RESULT redis-broadcast close ok_publishes={} on_broker={} missing={}",
            ok.len(),
            seen.len(),
            ok.difference(&seen).count()
        );
        assert!(
            missing.is_empty(),
            "accepted before close but never published: {missing:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_leaves_every_accepted_stream_publish_and_ack_on_the_broker() {
    let Some(server) = RedisServer::start("faults_close_stream") else {
        return;
    };
    within("close (stream)", async {
        let bus = bus(&server.url(), Mode::Stream, |_| {}).await;
        // Acks: deliver 500 entries, ack them all, close at once; none may stay pending.
        let mut sub = bus
            .subscribe(pat("acks.t"), SubscribeOptions::new().group("closers"))
            .await
            .unwrap();
        for i in 0..500 {
            bus.publish(Message::new(topic("acks.t"), i.to_string())).await.unwrap();
        }
        for _ in 0..500 {
            let d = sub.recv_timeout(WAIT).await.unwrap().expect("open");
            d.ack().await.unwrap();
        }
        let ok = publish_then_close(Arc::new(bus), &topic("close.t"), 8, 3_000).await;
        let xlen: usize = server
            .cli(&["XLEN", "busway:stream:close.t"])
            .trim()
            .parse()
            .expect("XLEN");
        let pending = server.cli(&["XPENDING", "busway:stream:acks.t", "closers"]);
        let pending_count: usize = pending.lines().next().unwrap_or("").trim().parse().expect("XPENDING");
        println!(
            "RESULT redis-stream close ok_publishes={} xlen={xlen} acked=500 pending_after_close={pending_count}",
            ok.len()
        );
        assert!(xlen >= ok.len(), "XLEN {xlen} < {} Ok'd publishes", ok.len());
        // Every Ok'd payload is in the stream.
        let entries = server.cli(&["XRANGE", "busway:stream:close.t", "-", "+"]);
        let stored: HashSet<&str> = entries.lines().map(str::trim).collect();
        let missing: Vec<_> = ok.iter().filter(|id| !stored.contains(id.as_str())).take(10).collect();
        assert!(missing.is_empty(), "Ok'd but not in the stream: {missing:?}");
        assert_eq!(pending_count, 0, "acked entries still pending after close: {pending}");
    })
    .await;
}
