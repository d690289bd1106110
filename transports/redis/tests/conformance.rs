//! The conformance suite on Redis, broadcast and stream mode, a fresh redis-server per case.

mod common;

use std::sync::Arc;
use std::time::Duration;

use busway::Mode;
use busway_testkit::conformance::Fixture;
use busway_testkit::redis::RedisServer;

async fn fixture(mode: Mode) -> Option<Fixture> {
    // No redis-server: the case is skipped (SKIPPED printed; BUSWAY_REQUIRE_BROKERS=1 fails).
    let server = RedisServer::start("redis conformance")?;
    // Short read blocks and rescans keep nack redelivery and wildcard discovery quick.
    // Stream mode dead-letters after 5 deliveries (the suite's other cases nack fewer times).
    let bus = common::connect("conformance", &server.url(), mode, |c| {
        c.read_block = Duration::from_millis(100);
        c.rescan_interval = Duration::from_millis(200);
        if mode == Mode::Stream {
            c.max_deliveries = Some(5);
            c.dead_letter = Some("dlq.conformance".to_string());
        }
    })
    .await;
    let f = Fixture::with_guard(Arc::new(bus), server);
    Some(match mode {
        Mode::Stream => f.with_dead_letter(5, "dlq.conformance"),
        Mode::Broadcast => f,
    })
}

mod broadcast {
    async fn fixture() -> Option<busway_testkit::conformance::Fixture> {
        super::fixture(busway::Mode::Broadcast).await
    }
    busway_testkit::conformance_tests!(fixture);
}

mod stream {
    async fn fixture() -> Option<busway_testkit::conformance::Fixture> {
        super::fixture(busway::Mode::Stream).await
    }
    busway_testkit::conformance_tests!(fixture);
}
