//! The conformance suite on a Router of MemoryBuses, in broadcast and in stream mode: the
//! router must behave as one bus. The table spreads some cases' topics over several buses,
//! so wildcard subscriptions merge and filter across buses.

use std::sync::Arc;

use busway::{Bus, MemoryBus, Router};
use busway_testkit::conformance::Fixture;

fn router(make: fn(&str) -> MemoryBus) -> Fixture {
    let bus = |name: &str| -> Arc<dyn Bus> { Arc::new(make(name)) };
    let router = Router::builder()
        .bus("a", bus("a"))
        .bus("b", bus("b"))
        .bus("main", bus("main"))
        // Case topics are `<random>.<case>.<rest>`.
        .route("*.wildcard_semantics.a.>", &["a"])
        .route("*.wildcard_semantics.x.*", &["b"])
        .route("*.topics_do_not_cross_talk.t1", &["a"])
        .route("*.topics_do_not_cross_talk.t2", &["b"])
        .route("*.request_reply.>", &["b"])
        .route("*.consumer_groups_share_and_split.>", &["a"])
        .default_to(&["main"])
        .build()
        .expect("a valid table");
    Fixture::new(Arc::new(router))
}

mod broadcast {
    use super::*;

    async fn fixture() -> Fixture {
        router(MemoryBus::new)
    }

    busway_testkit::conformance_tests!(fixture);
}

mod stream {
    use super::*;

    async fn fixture() -> Fixture {
        router(MemoryBus::stream)
    }

    busway_testkit::conformance_tests!(fixture);
}
