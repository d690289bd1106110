//! The conformance suite on NATS: core NATS (broadcast) and JetStream (stream), each case on
//! its own nats-server.

use std::sync::Arc;

use busway::Mode;
use busway_nats::{NatsBus, NatsConfig};
use busway_testkit::conformance::Fixture;
use busway_testkit::nats::NatsServer;

async fn fixture(mode: Mode) -> Option<Fixture> {
    // No nats-server: the case is skipped (SKIPPED printed; BUSWAY_REQUIRE_BROKERS=1 fails).
    let server = NatsServer::start("nats conformance")?;
    let mut config = NatsConfig::new("conformance", server.url())
        .mode(mode)
        .app("conformance");
    // Stream mode dead-letters after 5 deliveries (the suite's other cases nack fewer times).
    if mode == Mode::Stream {
        config.options.max_deliveries = Some(5);
        config.options.dead_letter = Some("dlq.conformance".to_string());
    }
    let bus = NatsBus::connect(config)
        .await
        .expect("connect to the test nats-server");
    let f = Fixture::with_guard(Arc::new(bus), server);
    Some(match mode {
        Mode::Stream => f.with_dead_letter(5, "dlq.conformance"),
        Mode::Broadcast => f,
    })
}

mod core {
    async fn fixture() -> Option<busway_testkit::conformance::Fixture> {
        super::fixture(busway::Mode::Broadcast).await
    }
    busway_testkit::conformance_tests!(fixture);
}

mod jetstream {
    async fn fixture() -> Option<busway_testkit::conformance::Fixture> {
        super::fixture(busway::Mode::Stream).await
    }
    busway_testkit::conformance_tests!(fixture);
}
