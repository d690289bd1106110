//! TLS to a nats-server with a CA generated in the test (openssl CLI).

mod common;

use busway_testkit::tls::make_certs;

use busway::{ErrorKind, Mode};
use busway_testkit::nats::{NatsServer, NatsServerOptions};
use common::{connect, round_trip};

#[tokio::test]
async fn tls_with_a_generated_ca() {
    let certs = tempfile::tempdir().unwrap();
    if !make_certs(certs.path()) {
        eprintln!("SKIPPED tls_with_a_generated_ca: openssl could not make certificates");
        return;
    }
    let d = certs.path().display();
    let options = NatsServerOptions {
        extra_conf: Some(format!(
            "tls {{\n  cert_file: \"{d}/server.pem\"\n  key_file: \"{d}/server.key\"\n}}"
        )),
        ..Default::default()
    };
    let Some(server) = NatsServer::start_with("tls", options) else {
        return;
    };

    // Without the CA the server's certificate is not trusted: a clear connection error.
    let err = connect(&server.url(), "sec", Mode::Broadcast, "tls_required = true")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.to_string().contains("\"sec\""), "{err}");

    let keys = format!("tls_required = true\ntls_ca = \"{d}/ca.pem\"");
    let bus = connect(&server.url(), "sec", Mode::Broadcast, &keys)
        .await
        .unwrap();
    round_trip(&bus, "t.x", "over tls").await;
}
