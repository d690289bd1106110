//! The conformance suite on a Router mixing a memory bus, a Redis bus and a NATS bus (each on
//! its own private broker), built from a config file through the transport registry: the
//! path a platform's start-up code takes. Broadcast mode mixes memory, Redis pub/sub and core
//! NATS; stream mode mixes memory streams, Redis Streams and JetStream. The table spreads
//! cases over the three buses, and some cases' wildcard subscriptions over two or three.

use std::sync::Arc;

use busway::{Config, Mode, Registry, Router};
use busway_testkit::conformance::Fixture;
use busway_testkit::nats::NatsServer;
use busway_testkit::redis::RedisServer;

async fn fixture(mode: Mode) -> Option<Fixture> {
    let redis = RedisServer::start("mixed router conformance")?;
    let nats = NatsServer::start("mixed router conformance")?;
    // Case topics are `<random>.<case>.<rest>`. Redis pub/sub has no consumer groups, so the
    // group case goes where groups exist; everything else not named goes to NATS.
    let toml = format!(
        r#"
[app]
name = "mixed"

[buses.mem]
transport = "memory"
mode = "{mode}"

[buses.redis]
transport = "redis"
url = "{redis}"
mode = "{mode}"
read_block = "100ms"
rescan_interval = "200ms"

[buses.nats]
transport = "nats"
url = "{nats}"
mode = "{mode}"

[[routes]]
match = "*.wildcard_semantics.a.>"
to = "redis"

[[routes]]
match = "*.wildcard_semantics.x.*"
to = "mem"

[[routes]]
match = "*.topics_do_not_cross_talk.t1"
to = "redis"

[[routes]]
match = "*.topics_do_not_cross_talk.t2"
to = "mem"

[[routes]]
match = "*.payload_and_headers_intact.>"
to = "redis"

[[routes]]
match = "*.request_reply.>"
to = "redis"

[[routes]]
match = "*.per_publisher_order.>"
to = "redis"

[[routes]]
match = "*.consumer_groups_share_and_split.>"
to = "{groups}"

[default]
to = "nats"
"#,
        redis = redis.url(),
        nats = nats.url(),
        groups = if mode == Mode::Stream {
            "redis"
        } else {
            "nats"
        },
    );
    let config = Config::from_toml(&toml, "mixed.toml").expect("a valid config");
    let mut registry = Registry::new();
    busway_redis::register(&mut registry);
    busway_nats::register(&mut registry);
    let router = Router::from_config(&config, &registry)
        .await
        .expect("connect every bus");
    Some(Fixture::with_guard(Arc::new(router), (redis, nats)))
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
