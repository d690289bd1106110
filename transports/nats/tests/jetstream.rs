//! Stream mode on a real nats-server with JetStream: ack, nack, redelivery, dead letters,
//! replay, groups, request/reply and a kill -9 restart.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use busway::{Bus, ErrorKind, Message, Mode, StartFrom, SubscribeOptions};
use busway_testkit::nats::NatsServer;
use common::{connect, next, pattern, topic, wait_until, WAIT};

const STREAM: &str =
    "subjects = [\"orders.>\", \"dead.>\"]\nmax_deliveries = 3\ndead_letter = \"dead.orders\"";

#[tokio::test]
async fn ack_nack_and_redelivery_after_the_ack_timeout() {
    let Some(server) = NatsServer::start("js_ack") else {
        return;
    };
    let bus = connect(&server.url(), "eng", Mode::Stream, STREAM)
        .await
        .unwrap();
    assert!(bus.capabilities().ack && bus.capabilities().replay);
    let opts = SubscribeOptions::new()
        .group("billing")
        .ack_timeout(Duration::from_secs(1));
    let mut sub = bus
        .subscribe(pattern("orders.*"), opts.clone())
        .await
        .unwrap();
    bus.publish(Message::new(topic("orders.a"), "acked"))
        .await
        .unwrap();
    bus.publish(Message::new(topic("orders.b"), "nacked"))
        .await
        .unwrap();
    bus.publish(Message::new(topic("orders.c"), "ignored"))
        .await
        .unwrap();

    let mut seen = Vec::new();
    for _ in 0..3 {
        let d = next(&mut sub).await;
        assert!(d.is_ackable());
        assert_eq!(d.attempt(), 1);
        match &d.message().payload[..] {
            b"acked" => d.ack().await.unwrap(),
            b"nacked" => d.nack().await.unwrap(),
            _ => drop(d), // neither: back after the 1 s ack timeout
        }
        seen.push(());
    }
    let mut again = HashSet::new();
    for _ in 0..2 {
        let d = next(&mut sub).await;
        assert_eq!(d.attempt(), 2, "{:?}", d.message());
        again.insert(d.message().payload.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(
        again,
        HashSet::from([bytes::Bytes::from("nacked"), bytes::Bytes::from("ignored")])
    );
    assert!(bus.stats().redelivered >= 2);
    // Everything is acked: a new member of the group gets nothing old.
    drop(sub);
    let mut sub = bus.subscribe(pattern("orders.*"), opts).await.unwrap();
    assert!(sub.recv_timeout(Duration::from_millis(1500)).await.is_err());
}

#[tokio::test]
async fn nack_with_delay_and_dead_letter_after_max_deliveries() {
    let Some(server) = NatsServer::start("js_dead_letter") else {
        return;
    };
    let bus = connect(&server.url(), "eng", Mode::Stream, STREAM)
        .await
        .unwrap();
    let mut dead = bus
        .subscribe(pattern("dead.>"), SubscribeOptions::new())
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(pattern("orders.>"), SubscribeOptions::new().group("g"))
        .await
        .unwrap();
    bus.publish(Message::new(topic("orders.poison"), "bad").with_id("p1"))
        .await
        .unwrap();
    for attempt in 1..=3 {
        let d = next(&mut sub).await;
        assert_eq!(d.attempt(), attempt);
        d.nack_after(Duration::from_millis(100)).await.unwrap();
    }
    let letter = next(&mut dead).await;
    assert_eq!(letter.message().topic.as_str(), "dead.orders");
    assert_eq!(&letter.message().payload[..], b"bad");
    assert_eq!(letter.message().headers.id.as_deref(), Some("p1"));
    assert_eq!(
        letter.message().headers.get("dead_letter_topic"),
        Some("orders.poison")
    );
    letter.ack().await.unwrap();
    wait_until("dead_lettered counted", || bus.stats().dead_lettered == 1).await;
    // Terminated: never delivered again.
    assert!(sub.recv_timeout(Duration::from_millis(800)).await.is_err());
}

#[tokio::test]
async fn replay_from_the_beginning_or_only_new() {
    let Some(server) = NatsServer::start("js_replay") else {
        return;
    };
    let bus = connect(&server.url(), "eng", Mode::Stream, STREAM)
        .await
        .unwrap();
    for i in 0..5 {
        bus.publish(Message::new(topic("orders.r"), format!("{i}")))
            .await
            .unwrap();
    }
    let mut all = bus
        .subscribe(
            pattern("orders.r"),
            SubscribeOptions::new().start(StartFrom::Beginning),
        )
        .await
        .unwrap();
    let mut new = bus
        .subscribe(
            pattern("orders.r"),
            SubscribeOptions::new().start(StartFrom::New),
        )
        .await
        .unwrap();
    for i in 0..5 {
        let d = next(&mut all).await;
        assert_eq!(d.message().payload, format!("{i}").as_bytes());
        d.ack().await.unwrap();
    }
    bus.publish(Message::new(topic("orders.r"), "5"))
        .await
        .unwrap();
    let d = next(&mut new).await;
    assert_eq!(&d.message().payload[..], b"5");
    d.ack().await.unwrap();
    assert_eq!(&next(&mut all).await.message().payload[..], b"5");
}

#[tokio::test]
async fn groups_split_the_stream() {
    let Some(server) = NatsServer::start("js_groups") else {
        return;
    };
    let bus = connect(&server.url(), "eng", Mode::Stream, STREAM)
        .await
        .unwrap();
    let other = connect(&server.url(), "eng", Mode::Stream, STREAM)
        .await
        .unwrap();
    let g = || SubscribeOptions::new().group("workers");
    let mut a = bus.subscribe(pattern("orders.>"), g()).await.unwrap();
    let mut b = other.subscribe(pattern("orders.>"), g()).await.unwrap();
    let n = 200;
    for i in 0..n {
        bus.publish(Message::new(topic("orders.w"), format!("{i}")))
            .await
            .unwrap();
    }
    let mut got = HashSet::new();
    let (mut from_a, mut from_b) = (0, 0);
    while got.len() < n {
        let d = tokio::select! {
            d = a.recv() => { from_a += 1; d.unwrap() }
            d = b.recv() => { from_b += 1; d.unwrap() }
            _ = tokio::time::sleep(WAIT) => panic!("got {} of {n}", got.len()),
        };
        d.ack().await.unwrap();
        got.insert(d.message().payload.clone());
    }
    assert!(from_a > 0 && from_b > 0, "split {from_a}/{from_b}");
}

#[tokio::test]
async fn request_reply_on_a_stream_bus() {
    let Some(server) = NatsServer::start("js_request") else {
        return;
    };
    let bus = connect(&server.url(), "eng", Mode::Stream, STREAM)
        .await
        .unwrap();
    let mut svc = bus
        .subscribe(
            pattern("orders.quote"),
            SubscribeOptions::new().group("svc"),
        )
        .await
        .unwrap();
    let responder = tokio::spawn(async move {
        let d = next(&mut svc).await;
        d.reply("42").await.unwrap();
        d.ack().await.unwrap();
    });
    let reply = bus
        .request(Message::new(topic("orders.quote"), "?"), WAIT)
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"42");
    responder.await.unwrap();
}

#[tokio::test]
async fn topics_outside_the_stream_are_refused_clearly() {
    let Some(server) = NatsServer::start("js_outside") else {
        return;
    };
    let bus = connect(&server.url(), "eng", Mode::Stream, STREAM)
        .await
        .unwrap();
    let err = bus
        .publish(Message::new(topic("elsewhere.x"), "x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(
        err.to_string().contains("elsewhere.x") && err.to_string().contains("BUSWAY_ENG"),
        "{err}"
    );
    let err = bus
        .subscribe(pattern("elsewhere.>"), SubscribeOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
}

#[tokio::test]
async fn stream_is_created_then_updated_from_config() {
    let Some(server) = NatsServer::start("js_stream_config") else {
        return;
    };
    let bus = connect(&server.url(), "eng", Mode::Stream, "max_msgs = 3")
        .await
        .unwrap();
    for i in 0..5 {
        bus.publish(Message::new(topic("eng.x"), format!("{i}")))
            .await
            .unwrap();
    }
    let mut all = bus
        .subscribe(
            pattern("eng.>"),
            SubscribeOptions::new().start(StartFrom::Beginning),
        )
        .await
        .unwrap();
    assert_eq!(
        &next(&mut all).await.message().payload[..],
        b"2",
        "max_msgs keeps the last 3"
    );
    // Rebuilding with other subjects uses the stream as it is (a warning names `subjects`)...
    let as_is = connect(
        &server.url(),
        "eng",
        Mode::Stream,
        "subjects = [\"eng.>\", \"more.>\"]",
    )
    .await
    .unwrap();
    let err = as_is
        .publish(Message::new(topic("more.y"), "y"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    // ...and `update_stream = true` changes it.
    let bus2 = connect(
        &server.url(),
        "eng",
        Mode::Stream,
        "subjects = [\"eng.>\", \"more.>\"]\nupdate_stream = true",
    )
    .await
    .unwrap();
    // Ok means the stream acknowledged it: it now captures `more.>`.
    bus2.publish(Message::new(topic("more.y"), "y"))
        .await
        .unwrap();
    let mut more = bus2
        .subscribe(
            pattern("more.>"),
            SubscribeOptions::new().start(StartFrom::Beginning),
        )
        .await
        .unwrap();
    assert_eq!(&next(&mut more).await.message().payload[..], b"y");
}

#[tokio::test]
async fn jetstream_survives_kill_9_without_losing_acknowledged_publishes() {
    let Some(mut server) = NatsServer::start("js_restart") else {
        return;
    };
    let bus = connect(&server.url(), "eng", Mode::Stream, STREAM)
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(
            pattern("orders.>"),
            SubscribeOptions::new().group("durable"),
        )
        .await
        .unwrap();
    let mut published = HashSet::new();
    for i in 0..50 {
        let id = format!("m{i}");
        bus.publish(Message::new(topic("orders.k"), id.clone()))
            .await
            .unwrap();
        published.insert(id);
    }
    let mut got = HashSet::new();
    for _ in 0..20 {
        let d = next(&mut sub).await;
        d.ack().await.unwrap();
        got.insert(String::from_utf8(d.message().payload.to_vec()).unwrap());
    }
    server.kill();
    server.restart();
    // Publishes during the reconnect may fail; the ones that returned Ok must arrive.
    let start = std::time::Instant::now();
    let mut i = 50;
    while published.len() < 100 {
        let id = format!("m{i}");
        i += 1;
        if bus
            .publish(Message::new(topic("orders.k"), id.clone()))
            .await
            .is_ok()
        {
            published.insert(id);
        }
        assert!(start.elapsed() < WAIT * 3, "publishing never recovered");
    }
    let start = std::time::Instant::now();
    while !published.is_subset(&got) {
        assert!(
            start.elapsed() < WAIT * 3,
            "missing after restart: {:?}",
            published.difference(&got).collect::<Vec<_>>()
        );
        if let Ok(Some(d)) = sub.recv_timeout(Duration::from_secs(1)).await {
            d.ack().await.ok();
            got.insert(String::from_utf8(d.message().payload.to_vec()).unwrap());
        }
    }
    assert!(bus.stats().reconnects >= 1);
}

#[tokio::test]
async fn a_foreign_publisher_goes_first_and_groups_use_the_configured_durable_name() {
    let Some(server) = NatsServer::start("js_foreign_first") else {
        return;
    };
    let keys = "stream = \"PLATFORM\"\nsubjects = [\"engine.>\"]\ndurable = \"{group}\"";
    // The bus creates the stream with its configured subjects at connect: a foreign
    // publisher can publish before any busway subscriber (or publisher) used a subject.
    let bus = connect(&server.url(), "eng", Mode::Stream, keys)
        .await
        .unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("priority", "high");
    js.publish_with_headers("engine.portfolio.fill", headers, "first".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(
            pattern("engine.portfolio.>"),
            SubscribeOptions::new()
                .group("portfolio")
                .start(StartFrom::Beginning),
        )
        .await
        .unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.message().topic.as_str(), "engine.portfolio.fill");
    assert_eq!(&d.message().payload[..], b"first");
    assert_eq!(d.message().headers.get("priority"), Some("high"));
    d.ack().await.unwrap();
    // The group's durable consumer is named as configured, so a foreign consumer of the
    // same durable shares its position.
    let mut stream = js.get_stream("PLATFORM").await.unwrap();
    let info = stream
        .consumer_info("portfolio")
        .await
        .expect("durable \"portfolio\"");
    assert_eq!(info.config.filter_subject, "engine.portfolio.>");
    assert_eq!(info.num_ack_pending, 0);
    let _ = stream.info().await.unwrap();
    // The same group on another pattern would need a second durable of the same name.
    let err = bus
        .subscribe(
            pattern("engine.risk.>"),
            SubscribeOptions::new().group("portfolio"),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("\"portfolio\"") && err.to_string().contains("{hash}"),
        "{err}"
    );
}

#[tokio::test]
async fn durable_names_without_a_group_or_with_bad_characters_are_refused() {
    for (durable, want) in [
        ("fixed", "has no {group}"),
        ("{group}.x", "'.' is neither a placeholder"),
        ("{grp}", "has no {group}"),
    ] {
        let config = common::bus_config(
            "nats://127.0.0.1:1",
            Mode::Stream,
            &format!("durable = \"{durable}\""),
            None,
        );
        let err =
            busway_nats::NatsConfig::from_context(&common::context("eng", &config)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(
            err.to_string()
                .starts_with("test.toml: buses.eng.durable: ")
                && err.to_string().contains(want),
            "{durable}: {err}"
        );
    }
}
