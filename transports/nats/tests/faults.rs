//! Fault tests against real nats-server processes started per test (never the shared one):
//! kill -9 and restart under load (core and JetStream), a hung (SIGSTOPped) server, slow
//! consumers, and `close` flushing what was accepted. Each prints `RESULT ...` lines copied
//! into RELIABILITY.md.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busway::{Bus, Message, Mode, Overflow, SubscribeOptions};
use busway_testkit::faults::{
    check_hung_error, publish_then_close, restart_under_load, slow_consumer_with_dropping_policy,
    wait_until, within, Guarantee, LoadPlan,
};
use busway_testkit::nats::NatsServer;
use common::{connect, connect_with, pattern, topic, WAIT};
use futures::StreamExt;

// ---------------------------------------------------------------------------------------
// 1. Broker restart under load
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_restart_under_load_reconnects_and_counts_losses() {
    let Some(server) = NatsServer::start("faults_core_restart") else {
        return;
    };
    within("core restart under load", async {
        let bus = Arc::new(
            connect(&server.url(), "faults", Mode::Broadcast, "")
                .await
                .unwrap(),
        );
        let sub = bus
            .subscribe(
                pattern("load.>"),
                SubscribeOptions::new()
                    .capacity(20_000)
                    .overflow(Overflow::Block),
            )
            .await
            .unwrap();
        let (report, _server) = restart_under_load(
            "nats-core",
            bus.clone(),
            sub,
            server,
            LoadPlan::default(),
            Guarantee::AtMostOnce,
        )
        .await;
        println!("{}", bus.stats());
        report.check(Guarantee::AtMostOnce);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_restart_under_load_delivers_every_ok_publish() {
    let Some(server) = NatsServer::start("faults_js_restart") else {
        return;
    };
    within("JetStream restart under load", async {
        let bus = Arc::new(
            connect(&server.url(), "faults", Mode::Stream, "")
                .await
                .unwrap(),
        );
        let sub = bus
            .subscribe(
                pattern("load.orders"),
                SubscribeOptions::new()
                    .group("faults")
                    .capacity(20_000)
                    .ack_timeout(Duration::from_secs(10)),
            )
            .await
            .unwrap();
        let (report, _server) = restart_under_load(
            "nats-jetstream",
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
    let Some(mut server) = NatsServer::start("faults_hung") else {
        return;
    };
    within("hung broker", async {
        let short = "publish_timeout = \"500ms\"";
        let core = connect(&server.url(), "faults", Mode::Broadcast, short)
            .await
            .unwrap();
        let js = connect(&server.url(), "faults", Mode::Stream, short)
            .await
            .unwrap();
        let mut csub = core
            .subscribe(pattern("hung.c"), SubscribeOptions::new())
            .await
            .unwrap();
        let mut jsub = js
            .subscribe(pattern("faults.hung"), SubscribeOptions::new().group("g"))
            .await
            .unwrap();

        server.process().pause();

        let t = Instant::now();
        let err = js
            .publish(Message::new(topic("faults.hung"), "frozen"))
            .await
            .expect_err("a JetStream publish to a frozen server must fail");
        check_hung_error(
            "nats",
            "jetstream_publish",
            "faults",
            &err,
            t.elapsed(),
            SHORT,
        );

        // Core publishes are accepted into the client's buffer; flush reports the hang.
        core.publish(Message::new(topic("hung.c"), "queued"))
            .await
            .unwrap();
        let t = Instant::now();
        let err = core.flush().await.expect_err("flush to a frozen server");
        check_hung_error("nats", "core_flush", "faults", &err, t.elapsed(), SHORT);

        let t = Instant::now();
        let err = core
            .request(Message::new(topic("hung.rpc"), "q"), SHORT)
            .await
            .expect_err("a request to a frozen server");
        check_hung_error("nats", "core_request", "faults", &err, t.elapsed(), SHORT);

        let t = Instant::now();
        let err = js
            .request(Message::new(topic("faults.rpc"), "q"), SHORT)
            .await
            .expect_err("a stream request to a frozen server");
        // The stream request publishes (PubAck wait) and then waits for the reply.
        check_hung_error(
            "nats",
            "jetstream_request",
            "faults",
            &err,
            t.elapsed(),
            SHORT * 2,
        );

        server.process().resume();

        // Everything resumes. The connection stayed up (SIGSTOP keeps sockets open), so the
        // core message buffered during the freeze arrives first.
        let d = csub.recv_timeout(WAIT).await.unwrap().expect("a delivery");
        println!(
            "RESULT nats-hung core_resumed first_delivery={:?}",
            String::from_utf8_lossy(&d.message().payload)
        );
        let start = Instant::now();
        loop {
            match js
                .publish(Message::new(topic("faults.hung"), "after"))
                .await
            {
                Ok(()) => break,
                Err(e) => assert!(start.elapsed() < WAIT, "stream publish never resumed: {e}"),
            }
        }
        // The frozen publish may have been stored when the server thawed (the publisher was
        // told it failed); skip it if so.
        loop {
            let d = jsub.recv_timeout(WAIT).await.unwrap().expect("a delivery");
            d.ack().await.unwrap();
            if &d.message().payload[..] == b"after" {
                break;
            }
        }
        core.flush().await.unwrap();
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 3. Slow consumer
// ---------------------------------------------------------------------------------------

// The drop-policy case is shared with the other transports: `slow_consumer_with_dropping_policy`
// in busway-testkit.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_slow_consumer_with_dropping_policy_does_not_hold_back_others() {
    let Some(server) = NatsServer::start("faults_slow_drop") else {
        return;
    };
    within("slow consumer (drop)", async {
        // async-nats's per-subscription channel must hold a whole burst: the publisher
        // outpaces the fast subscriber's pump on 2 cores, and what does not fit is dropped
        // by the client for the fast subscriber too (a sizing matter, not the stalled one).
        // `drop_newest` is the bus's default, so the fast subscriber (its queue holds a whole
        // round: it never drops) and the reading one share one NATS subscription with the
        // stalled one, as subscriptions of one subject under dropping policies do.
        let bus = connect_with(
            &server.url(),
            "faults",
            Mode::Broadcast,
            "client_capacity = 32768",
            Some(Overflow::DropNewest),
        )
        .await
        .unwrap();
        slow_consumer_with_dropping_policy(Arc::new(bus), "nats-core").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_slow_consumer_under_block_drops_in_the_client_and_counts_them() {
    let Some(server) = NatsServer::start("faults_slow_block") else {
        return;
    };
    within("slow consumer (block)", async {
        // async-nats channel of 64 per subscription behind a blocking queue of 10.
        let bus = connect(
            &server.url(),
            "faults",
            Mode::Broadcast,
            "client_capacity = 64",
        )
        .await
        .unwrap();
        let publisher = connect(&server.url(), "pub", Mode::Broadcast, "")
            .await
            .unwrap();
        let n = 2_000;
        let mut fast = bus
            .subscribe(
                pattern("blk.t"),
                SubscribeOptions::new()
                    .capacity(n)
                    .overflow(Overflow::DropNewest),
            )
            .await
            .unwrap();
        let mut slow = bus
            .subscribe(
                pattern("blk.t"),
                SubscribeOptions::new()
                    .capacity(10)
                    .overflow(Overflow::Block),
            )
            .await
            .unwrap();
        // Bursts of 20, each received by the fast subscriber before the next: its own
        // 64-deep client channel never overflows, while the slow one's cannot drain at all.
        for burst in 0..(n / 20) {
            for i in 0..20 {
                publisher
                    .publish(Message::new(topic("blk.t"), (burst * 20 + i).to_string()))
                    .await
                    .unwrap();
            }
            // The fast subscriber on the same bus has its own client channel: it gets all.
            for i in burst * 20..burst * 20 + 20 {
                let d = fast
                    .recv_timeout(WAIT)
                    .await
                    .unwrap_or_else(|e| panic!("fast got {i} of {n}: {e}"))
                    .expect("open");
                assert_eq!(d.message().payload, i.to_string().as_bytes());
            }
        }
        wait_until("client-side drops to be counted", WAIT, || {
            bus.stats().dropped > 0
        })
        .await;
        let mut got = 0;
        while let Ok(Some(_)) = slow.recv_timeout(Duration::from_millis(500)).await {
            got += 1;
        }
        // The settled count is exact once nothing is in flight.
        bus.flush().await.unwrap();
        let dropped = bus.stats().dropped;
        println!(
            "RESULT nats-core slow_consumer policy=block n={n} client_capacity=64 queue=10 slow_received={got} counted_dropped={dropped} fast_received={n}"
        );
        assert!(got >= 10 && got < n, "got {got}");
        // Exact, although async-nats's 128-deep event channel may have lost events.
        assert_eq!(got + dropped as usize, n, "got {got} dropped {dropped}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 4. Graceful shutdown
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_flushes_every_accepted_core_publish() {
    let Some(server) = NatsServer::start("faults_close_core") else {
        return;
    };
    within("close (core)", async {
        // A raw subscriber on its own connection, registered before publishing.
        let raw_client = async_nats::connect(server.url()).await.unwrap();
        let mut raw = raw_client.subscribe("close.t").await.unwrap();
        raw_client.flush().await.unwrap();
        let bus = connect(
            &server.url(),
            "faults",
            Mode::Broadcast,
            "framing = \"raw\"",
        )
        .await
        .unwrap();
        let ok = publish_then_close(Arc::new(bus), &topic("close.t"), 8, 5_000).await;
        let mut seen = HashSet::new();
        while !ok.is_subset(&seen) {
            match tokio::time::timeout(WAIT, raw.next()).await {
                Ok(Some(m)) => {
                    seen.insert(String::from_utf8(m.payload.to_vec()).unwrap());
                }
                _ => break,
            }
        }
        let missing: Vec<_> = ok.difference(&seen).take(10).collect();
        println!(
            "RESULT nats-core close ok_publishes={} on_broker={} missing={}",
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
async fn close_leaves_every_accepted_jetstream_publish_and_ack_on_the_broker() {
    let Some(server) = NatsServer::start("faults_close_js") else {
        return;
    };
    within("close (JetStream)", async {
        let bus = connect(
            &server.url(),
            "faults",
            Mode::Stream,
            "subjects = [\"close.>\", \"acks.>\"]",
        )
        .await
        .unwrap();
        // Acks: deliver 500 messages, ack them all, close at once; none may stay pending.
        let mut sub = bus
            .subscribe(pattern("acks.t"), SubscribeOptions::new().group("closers"))
            .await
            .unwrap();
        for i in 0..500 {
            bus.publish(Message::new(topic("acks.t"), i.to_string()))
                .await
                .unwrap();
        }
        for _ in 0..500 {
            let d = sub.recv_timeout(WAIT).await.unwrap().expect("open");
            d.ack().await.unwrap();
        }
        let ok = publish_then_close(Arc::new(bus), &topic("close.t"), 8, 3_000).await;

        let client = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("BUSWAY_FAULTS").await.unwrap();
        let stored = stream.info().await.unwrap().state.messages as usize;
        let mut ack_pending = 0;
        let mut consumers = stream.consumers();
        let mut names = Vec::new();
        while let Some(info) = consumers.next().await {
            let info = info.unwrap();
            ack_pending += info.num_ack_pending;
            names.push((info.name.clone(), info.num_ack_pending, info.num_pending));
        }
        println!(
            "RESULT nats-jetstream close ok_publishes={} stored={stored} acked=500 ack_pending_after_close={ack_pending}",
            ok.len()
        );
        assert!(
            stored >= 500 + ok.len(),
            "stream holds {stored} < 500 + {} Ok'd publishes",
            ok.len()
        );
        assert_eq!(ack_pending, 0, "acked but still pending after close: {names:?}");
    })
    .await;
}
