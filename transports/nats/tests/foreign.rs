//! A mixed fleet on one nats-server (JetStream) started per test: a Python engine on nats-py
//! (`testkit/python/nats_js.py`) and busway engines, both ways, on a stream whose subjects
//! and durable names come from busway's config.

mod common;

use std::time::Duration;

use busway::{Bus, Message, Mode, StartFrom, SubscribeOptions};
use busway_testkit::nats::NatsServer;
use busway_testkit::python::{lines_of, Python};
use common::{connect, next, pattern, topic};

const PLATFORM: &str =
    "stream = \"PLATFORM\"\nsubjects = [\"engine.>\", \"marketdata.>\"]\ndurable = \"{group}\"";

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[tokio::test]
async fn nats_py_publishes_into_the_configured_stream_before_any_busway_subscriber() {
    let Some(python) = Python::find("foreign_nats_py_first") else {
        return;
    };
    let Some(server) = NatsServer::start("foreign_nats_py_first") else {
        return;
    };
    // Connecting creates the stream with its configured subjects; nothing subscribes yet.
    let bus = connect(&server.url(), "platform", Mode::Stream, PLATFORM)
        .await
        .unwrap();
    let url = server.url();
    let out = python
        .spawn(
            "nats_js.py",
            &[
                "publish",
                "--url",
                &url,
                "--subject",
                "engine.portfolio.order_fill",
                "--count",
                "20",
                "--header",
                "priority=high",
                "--header",
                "source_instance=2",
            ],
        )
        .finish(Duration::from_secs(60))
        .await;
    lines_of("publish", &out);
    let mut sub = bus
        .subscribe(
            pattern("engine.portfolio.>"),
            SubscribeOptions::new()
                .group("portfolio")
                .start(StartFrom::Beginning),
        )
        .await
        .unwrap();
    for seq in 0..20 {
        let d = next(&mut sub).await;
        let m = d.message();
        assert_eq!(m.topic.as_str(), "engine.portfolio.order_fill");
        assert_eq!(json(std::str::from_utf8(&m.payload).unwrap())["seq"], seq);
        assert_eq!(m.headers.get("priority"), Some("high"));
        assert_eq!(m.headers.get("source_instance"), Some("2"));
        d.ack().await.unwrap();
    }
}

#[tokio::test]
async fn busway_messages_reach_a_nats_py_durable_consumer_with_their_headers() {
    let Some(python) = Python::find("foreign_busway_to_nats_py") else {
        return;
    };
    let Some(server) = NatsServer::start("foreign_busway_to_nats_py") else {
        return;
    };
    let bus = connect(&server.url(), "platform", Mode::Stream, PLATFORM)
        .await
        .unwrap();
    for seq in 0..20 {
        let m = Message::new(
            topic("marketdata.quote"),
            format!("{{\"seq\":{seq}}}").into_bytes(),
        )
        .with_id(format!("m-{seq}"))
        .with_content_type("application/json")
        .with_header("priority", "low");
        bus.publish(m).await.unwrap();
    }
    let url = server.url();
    let out = python
        .spawn(
            "nats_js.py",
            &[
                "consume",
                "--url",
                &url,
                "--stream",
                "PLATFORM",
                "--durable",
                "quotes",
                "--filter",
                "marketdata.quote",
                "--count",
                "20",
            ],
        )
        .finish(Duration::from_secs(60))
        .await;
    let lines = lines_of("consume", &out);
    assert_eq!(lines.len(), 20);
    for (seq, line) in lines.iter().enumerate() {
        let m = json(line);
        assert_eq!(m["subject"], "marketdata.quote", "{line}");
        assert_eq!(json(m["data"].as_str().unwrap())["seq"], seq, "{line}");
        assert_eq!(m["headers"]["priority"], "low", "{line}");
        assert_eq!(m["headers"]["Content-Type"], "application/json", "{line}");
        assert_eq!(m["headers"]["Busway-Id"], format!("m-{seq}"), "{line}");
    }
    // The durable the Python engine made is the one a busway engine of group "quotes"
    // joins (durable = "{group}"): everything is acked, so it gets nothing again.
    let mut sub = bus
        .subscribe(
            pattern("marketdata.quote"),
            SubscribeOptions::new().group("quotes"),
        )
        .await
        .unwrap();
    assert!(sub.recv_timeout(Duration::from_millis(1500)).await.is_err());
    bus.publish(Message::new(topic("marketdata.quote"), &b"next"[..]))
        .await
        .unwrap();
    let d = next(&mut sub).await;
    assert_eq!(&d.message().payload[..], b"next");
    d.ack().await.unwrap();
}

#[tokio::test]
async fn nats_py_and_busway_request_each_other_on_core_nats_with_headers() {
    let Some(python) = Python::find("foreign_nats_rpc") else {
        return;
    };
    let Some(server) = NatsServer::start("foreign_nats_rpc") else {
        return;
    };
    let bus = connect(&server.url(), "rpc", Mode::Broadcast, "")
        .await
        .unwrap();
    let url = server.url();

    // A Python requester, a busway responder.
    let mut svc = bus
        .subscribe(pattern("svc.ping"), SubscribeOptions::new())
        .await
        .unwrap();
    let requester = python.spawn(
        "nats_core.py",
        &[
            "request",
            "--url",
            &url,
            "--subject",
            "svc.ping",
            "--data",
            "ping",
            "--header",
            "priority=high",
        ],
    );
    let d = next(&mut svc).await;
    assert_eq!(&d.message().payload[..], b"ping");
    assert_eq!(d.message().headers.get("priority"), Some("high"));
    d.reply("pong").await.unwrap();
    let lines = lines_of(
        "requester",
        &requester.finish(Duration::from_secs(30)).await,
    );
    assert_eq!(json(&lines[0])["data"], "pong", "{lines:?}");

    // A busway requester, a Python responder (which sends the request's headers back).
    let responder = python
        .spawn(
            "nats_core.py",
            &[
                "reply",
                "--url",
                &url,
                "--subject",
                "svc.py",
                "--count",
                "1",
            ],
        )
        .ready()
        .await;
    let answer = bus
        .request(
            Message::new(topic("svc.py"), &b"hello"[..]).with_header("priority", "low"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(&answer.payload[..], b"pong:hello");
    assert_eq!(answer.headers.get("priority"), Some("low"));
    let lines = lines_of(
        "responder",
        &responder.finish(Duration::from_secs(30)).await,
    );
    let request = json(&lines[0]);
    assert_eq!(request["data"], "hello", "{lines:?}");
    assert_eq!(request["headers"]["priority"], "low", "{lines:?}");
}
