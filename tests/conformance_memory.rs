//! The conformance suite on MemoryBus, in broadcast and in stream mode.

mod broadcast {
    use std::sync::Arc;

    use busway::MemoryBus;
    use busway_testkit::conformance::Fixture;

    async fn fixture() -> Fixture {
        Fixture::new(Arc::new(MemoryBus::new("conformance")))
    }

    busway_testkit::conformance_tests!(fixture);
}

mod stream {
    use std::sync::Arc;

    use busway::MemoryBus;
    use busway_testkit::conformance::Fixture;

    async fn fixture() -> Fixture {
        Fixture::new(Arc::new(MemoryBus::stream("conformance")))
    }

    busway_testkit::conformance_tests!(fixture);
}
