//! Config refused without a server: `NatsFactory::validate` (what `busway check` runs)
//! refuses what `build` refuses, with the same message.

mod common;

use busway::transport::TransportFactory;
use busway::{ErrorKind, Mode};
use busway_nats::NatsFactory;
use common::bus_config;

/// The errors of `validate` and `build` for bus `md` on `url` with NATS keys `extra`
/// (TOML): both must fail, with the same message.
async fn refused(url: &str, mode: Mode, extra: &str) -> String {
    let config = bus_config(url, mode, extra, None);
    let ctx = common::context("md", &config);
    let validated = NatsFactory
        .validate(ctx)
        .expect_err("validate must refuse it");
    let built = match NatsFactory.build(ctx).await {
        Ok(_) => panic!("build must refuse it"),
        Err(e) => e,
    };
    assert_eq!(validated.kind(), ErrorKind::InvalidConfig, "{validated}");
    assert_eq!(validated.to_string(), built.to_string());
    validated.to_string()
}

#[tokio::test]
async fn max_deliver_is_refused_naming_max_deliveries() {
    let err = refused("nats://127.0.0.1:4222", Mode::Stream, "max_deliver = 3").await;
    assert!(
        err.contains("buses.md.max_deliver") && err.contains("`max_deliveries`"),
        "{err}"
    );
}

#[tokio::test]
async fn max_deliveries_without_dead_letter_is_refused_naming_both() {
    let err = refused("nats://127.0.0.1:4222", Mode::Stream, "max_deliveries = 3").await;
    assert!(
        err.contains("buses.md.max_deliveries") && err.contains("`dead_letter`"),
        "{err}"
    );
}

#[tokio::test]
async fn validate_refuses_what_connect_would_without_a_server() {
    let err = refused("redis://127.0.0.1:6379", Mode::Broadcast, "").await;
    assert!(
        err.contains("buses.md.url") && err.contains("redis"),
        "{err}"
    );

    let err = refused("nats://127.0.0.1:99999", Mode::Broadcast, "").await;
    assert!(err.contains("buses.md.url"), "{err}");

    let err = refused(
        "nats://127.0.0.1:4222,nats://u:s3cret@127.0.0.1:bad",
        Mode::Broadcast,
        "",
    )
    .await;
    assert!(
        err.contains("buses.md.url") && !err.contains("s3cret"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-ca.pem").display().to_string();
    let err = refused(
        "tls://127.0.0.1:4222",
        Mode::Broadcast,
        &format!("tls_ca = \"{missing}\""),
    )
    .await;
    assert!(
        err.contains("buses.md.tls_ca") && err.contains("missing-ca.pem"),
        "{err}"
    );

    let err = refused(
        "nats://127.0.0.1:4222",
        Mode::Broadcast,
        "tls_cert = \"c.pem\"",
    )
    .await;
    assert!(err.contains("buses.md.tls_cert"), "{err}");

    let err = refused("nats://127.0.0.1:4222", Mode::Broadcast, "password = \"x\"").await;
    assert!(err.contains("buses.md.user"), "{err}");

    let err = refused("nats://127.0.0.1:4222", Mode::Stream, "stream = \"a.b\"").await;
    assert!(err.contains("buses.md.stream"), "{err}");

    let err = refused(
        "nats://127.0.0.1:4222",
        Mode::Stream,
        "dead_letter = \"a.>\"",
    )
    .await;
    assert!(err.contains("buses.md.dead_letter"), "{err}");

    let err = refused(
        "nats://127.0.0.1:4222",
        Mode::Broadcast,
        "framing = \"headers\"",
    )
    .await;
    assert!(err.contains("buses.md"), "{err}");
}
