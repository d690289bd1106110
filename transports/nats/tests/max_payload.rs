//! A server with a small `max_payload`: the limit covers payload + encoded headers of the
//! message being published, not a fixed header allowance.

mod common;

use busway::{Bus, ErrorKind, Message, Mode};
use busway_testkit::nats::{NatsServer, NatsServerOptions};
use common::{connect, round_trip, topic};

#[tokio::test]
async fn small_max_payload_allows_small_messages_and_names_the_limit() {
    let Some(server) = NatsServer::start_with(
        "small_max_payload",
        NatsServerOptions {
            max_payload: Some(1000),
            ..Default::default()
        },
    ) else {
        return;
    };
    let bus = connect(&server.url(), "tiny", Mode::Broadcast, "")
        .await
        .unwrap();
    assert_eq!(bus.capabilities().max_payload, 1000);
    round_trip(&bus, "t.small", "hello").await;
    // 990 bytes fit alone; with a header they do not.
    let mut big = Message::new(topic("t.big"), vec![b'x'; 990]);
    big.headers.insert("trace", "0123456789abcdef");
    let err = bus.publish(big).await.unwrap_err();
    println!("RESULT small_max_payload error={err}");
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("\"tiny\"") && text.contains("t.big"),
        "{text}"
    );
}
