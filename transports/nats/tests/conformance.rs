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
    let config = NatsConfig::new("conformance", server.url())
        .mode(mode)
        .app("conformance");
    let bus = NatsBus::connect(config)
        .await
        .expect("connect to the test nats-server");
    Some(Fixture::with_guard(Arc::new(bus), server))
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
