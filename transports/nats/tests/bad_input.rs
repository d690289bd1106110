//! A foreign NATS publisher sending headers busway cannot decode: counted in
//! `decode_errors`, skipped, and the subscription goes on (core and JetStream). An
//! oversized publish is refused naming the limit.

mod common;

use std::time::Duration;

use async_nats::HeaderMap;
use busway::{Bus, ErrorKind, Message, Mode, Pattern, SubscribeOptions, Topic};
use busway_testkit::nats::{NatsServer, NatsServerOptions};
use common::{connect, next, wait_until};

fn bad_headers() -> Vec<(&'static str, HeaderMap)> {
    let mut ts = HeaderMap::new();
    ts.insert("Busway-Ts", "notanumber");
    let mut reply = HeaderMap::new();
    reply.insert("Busway-Reply-To", "bad topic");
    let mut wildcard = HeaderMap::new();
    wildcard.insert("Busway-Id", "fine");
    wildcard.insert("Busway-Reply-To", "a.>");
    vec![("ts", ts), ("reply", reply), ("wildcard reply", wildcard)]
}

#[tokio::test]
async fn core_counts_and_skips_undecodable_headers() {
    let Some(server) = NatsServer::start("nats_bad_headers_core") else {
        return;
    };
    let bus = connect(&server.url(), "md", Mode::Broadcast, "")
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(Pattern::new("bad.>").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    let raw = async_nats::connect(server.url()).await.unwrap();
    let bad = bad_headers();
    for (_, headers) in &bad {
        raw.publish_with_headers("bad.x", headers.clone(), "skipped".into())
            .await
            .unwrap();
    }
    // A foreign message without busway headers is fine, and so is ours.
    raw.publish("bad.y", "foreign ok".into()).await.unwrap();
    raw.flush().await.unwrap();
    bus.publish(Message::new(Topic::new("bad.z").unwrap(), "ours"))
        .await
        .unwrap();
    // Two connections: the server may order their messages either way.
    let mut got = vec![
        next(&mut sub).await.message().payload.clone(),
        next(&mut sub).await.message().payload.clone(),
    ];
    got.sort();
    assert_eq!(got, vec![&b"foreign ok"[..], &b"ours"[..]]);
    assert_eq!(bus.stats().decode_errors, bad.len() as u64);
    assert_eq!(sub.stats().decode_errors, bad.len() as u64);
    assert!(
        sub.recv_timeout(Duration::from_millis(300)).await.is_err(),
        "nothing else is delivered"
    );
}

#[tokio::test]
async fn jetstream_terminates_and_counts_undecodable_headers() {
    let Some(server) = NatsServer::start("nats_bad_headers_js") else {
        return;
    };
    let bus = connect(&server.url(), "eng", Mode::Stream, "subjects = [\"bad.>\"]")
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(
            Pattern::new("bad.>").unwrap(),
            SubscribeOptions::new().group("g"),
        )
        .await
        .unwrap();
    let raw = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(raw);
    let bad = bad_headers();
    for (_, headers) in &bad {
        js.publish_with_headers("bad.x", headers.clone(), "skipped".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    bus.publish(Message::new(Topic::new("bad.z").unwrap(), "ours"))
        .await
        .unwrap();
    let d = next(&mut sub).await;
    assert_eq!(&d.message().payload[..], b"ours");
    d.ack().await.unwrap();
    wait_until("every bad message counted", || {
        bus.stats().decode_errors == bad.len() as u64
    })
    .await;
    // Terminated, not redelivered: nothing comes back after the ack wait either.
    assert!(
        sub.recv_timeout(Duration::from_secs(2)).await.is_err(),
        "a bad message came back"
    );
    assert_eq!(bus.stats().decode_errors, bad.len() as u64);
}

#[tokio::test]
async fn oversized_publish_is_refused_naming_the_limit() {
    let options = NatsServerOptions {
        max_payload: Some(4096),
        ..Default::default()
    };
    let Some(server) = NatsServer::start_with("nats_oversized", options) else {
        return;
    };
    for mode in [Mode::Broadcast, Mode::Stream] {
        let bus = connect(&server.url(), "md", mode, "").await.unwrap();
        let max = bus.capabilities().max_payload;
        assert!(
            max <= 4096,
            "{mode:?}: max_payload {max} above the server's"
        );
        let err = bus
            .publish(Message::new(
                Topic::new("md.big").unwrap(),
                vec![0u8; max + 1],
            ))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{mode:?}: {err}");
        let text = err.to_string();
        assert!(
            text.contains("\"md\"")
                && text.contains("\"md.big\"")
                && text.contains(&format!("limit of {max} bytes")),
            "{mode:?}: {text}"
        );
        // The server's limit holds payload and header block together: a core message with
        // no headers may fill it; a JetStream publish carries its `Nats-Msg-Id`, so a payload
        // of exactly the limit is refused naming both sizes, and one that leaves room passes.
        let exact = bus
            .publish(Message::new(Topic::new("md.big").unwrap(), vec![0u8; max]))
            .await;
        match mode {
            Mode::Broadcast => {
                exact.unwrap_or_else(|e| panic!("{mode:?}: exactly max_payload must pass: {e}"))
            }
            Mode::Stream => {
                let err = exact.unwrap_err();
                assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
                assert!(err.to_string().contains("limit of 4096"), "{err}");
                bus.publish(Message::new(
                    Topic::new("md.big").unwrap(),
                    vec![0u8; max - 256],
                ))
                .await
                .unwrap_or_else(|e| panic!("{mode:?}: room left for the headers: {e}"));
            }
        }
    }
}
