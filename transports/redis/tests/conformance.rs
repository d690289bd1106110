//! The conformance suite on Redis, broadcast and stream mode, a fresh redis-server per case.

use std::sync::Arc;

use busway::Mode;
use busway_redis::{RedisBus, RedisConfig, RedisOptions};
use busway_testkit::conformance::Fixture;
use busway_testkit::redis::RedisServer;

async fn fixture(mode: Mode) -> Option<Fixture> {
    // No redis-server: the case is skipped (SKIPPED printed; BUSWAY_REQUIRE_BROKERS=1 fails).
    let server = RedisServer::start("redis conformance")?;
    let mut options = RedisOptions::default();
    // Short read blocks and rescans keep nack redelivery and wildcard discovery quick.
    options.block_ms = 100;
    options.rescan_ms = 200;
    let config = RedisConfig::new("conformance", server.url())
        .app("test")
        .mode(mode)
        .options(options);
    let bus = RedisBus::connect(config).await.expect("connect");
    Some(Fixture::with_guard(Arc::new(bus), server))
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
