//! TLS to a nats-server with a CA generated in the test (openssl CLI).

mod common;

use std::path::Path;
use std::process::Command;

use busway::{ErrorKind, Mode};
use busway_testkit::nats::{NatsServer, NatsServerOptions};
use common::{connect, round_trip};

fn openssl(dir: &Path, args: &[&str]) -> bool {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A CA and a server certificate for 127.0.0.1; false when openssl is unavailable.
fn make_certs(dir: &Path) -> bool {
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=busway test CA",
        ],
    ) && openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ) && openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    )
}

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
