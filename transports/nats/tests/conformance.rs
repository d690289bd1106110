//! The conformance suite on NATS: core NATS (broadcast) and JetStream (stream), each case on
//! its own nats-server.

use std::sync::Arc;

use busway::{config::BusConfig, transport::BuildContext, Mode};
use busway_nats::NatsBus;
use busway_testkit::conformance::Fixture;
use busway_testkit::nats::NatsServer;

async fn fixture(mode: Mode) -> Option<Fixture> {
    // No nats-server: the case is skipped (SKIPPED printed; BUSWAY_REQUIRE_BROKERS=1 fails).
    let server = NatsServer::start("nats conformance")?;
    let mut config = BusConfig::new("nats");
    config.url = Some(server.url());
    config.mode = mode;
    let ctx = BuildContext {
        app: "conformance",
        bus: "conformance",
        config: &config,
        source: "conformance.toml",
    };
    let bus = NatsBus::connect(ctx)
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
