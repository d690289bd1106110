//! `rediss://` to a real TLS redis-server with a CA generated in the test (openssl CLI).
//! The crate's tests build with its `tls` feature (a dev-dependency on itself).

mod common;

use busway_testkit::tls::make_certs;

use std::path::Path;
use std::time::{Duration, Instant};

use busway::{Bus, ErrorKind, Message, Mode, SubscribeOptions};
use busway_redis::{RedisBus, RedisConfig};
use busway_testkit::{broker_binary, free_port, ServerProcess};

use common::{assert_refused, pat, topic, WAIT};

/// A redis-server that only speaks TLS (no plain port), with `requirepass`.
fn tls_server(test: &str, certs: &Path, password: &str) -> Option<ServerProcess> {
    let binary = broker_binary("redis-server", test)?;
    let port = free_port();
    let d = certs.display();
    let args: Vec<String> = [
        "--port".to_string(),
        "0".to_string(),
        "--tls-port".to_string(),
        port.to_string(),
        "--bind".to_string(),
        "127.0.0.1".to_string(),
        "--save".to_string(),
        String::new(),
        "--appendonly".to_string(),
        "no".to_string(),
        "--tls-cert-file".to_string(),
        format!("{d}/server.pem"),
        "--tls-key-file".to_string(),
        format!("{d}/server.key"),
        "--tls-ca-cert-file".to_string(),
        format!("{d}/ca.pem"),
        "--tls-auth-clients".to_string(),
        "no".to_string(),
        "--requirepass".to_string(),
        password.to_string(),
    ]
    .to_vec();
    Some(ServerProcess::start(&binary, args, port))
}

fn config(url: String, mode: Mode, ca: Option<String>) -> RedisConfig {
    let mut config = RedisConfig::new("sec", url).mode(mode);
    config.tls_ca = ca;
    config.connect_timeout = Duration::from_secs(3);
    config
}

#[tokio::test]
async fn rediss_with_a_generated_ca() {
    let certs = tempfile::tempdir().unwrap();
    if !make_certs(certs.path()) {
        eprintln!("SKIPPED rediss_with_a_generated_ca: openssl could not make certificates");
        return;
    }
    let d = certs.path().display().to_string();
    let Some(server) = tls_server("rediss_with_a_generated_ca", certs.path(), "tls-s3cret") else {
        return;
    };
    let url = format!("rediss://:tls-s3cret@127.0.0.1:{}", server.port());

    // Both modes work over TLS when the generated CA is trusted.
    for mode in [Mode::Broadcast, Mode::Stream] {
        let bus = RedisBus::connect(config(url.clone(), mode, Some(format!("{d}/ca.pem"))))
            .await
            .unwrap_or_else(|e| panic!("{mode:?} over TLS: {e}\n{}", server.log()));
        let mut sub = bus
            .subscribe(pat("t.x"), SubscribeOptions::new())
            .await
            .unwrap();
        bus.publish(Message::new(topic("t.x"), "over tls"))
            .await
            .unwrap();
        let d = sub.recv_timeout(WAIT).await.unwrap().unwrap();
        assert_eq!(&d.message().payload[..], b"over tls", "{mode:?}");
        let _ = d.ack().await;
        bus.close().await.unwrap();
    }

    // A CA that did not sign the server's certificate, or the system trust store (no
    // tls_ca): the handshake fails, promptly, with an error naming the bus and no password.
    for ca in [Some(format!("{d}/other-ca.pem")), None] {
        let start = Instant::now();
        let err = RedisBus::connect(config(url.clone(), Mode::Broadcast, ca.clone()))
            .await
            .expect_err("an untrusted server certificate must be refused");
        assert!(start.elapsed() < WAIT, "{ca:?}: took {:?}", start.elapsed());
        assert_eq!(err.kind(), ErrorKind::Connection, "{ca:?}: {err}");
        let text = format!("{err} {err:?}");
        assert!(text.contains("\"sec\""), "{text}");
        assert!(!text.contains("tls-s3cret"), "password printed: {text}");
    }

    // The right CA with a wrong password: the TLS session is up, then AUTH fails.
    let wrong = format!("rediss://:wrong-pw@127.0.0.1:{}", server.port());
    let err = RedisBus::connect(config(wrong, Mode::Broadcast, Some(format!("{d}/ca.pem"))))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(!format!("{err} {err:?}").contains("wrong-pw"), "{err}");

    // A plain redis:// client on the TLS port does not hang: it fails within its timeouts.
    let plain = format!("redis://:tls-s3cret@127.0.0.1:{}", server.port());
    let start = Instant::now();
    let err = RedisBus::connect(config(plain, Mode::Broadcast, None))
        .await
        .unwrap_err();
    assert!(start.elapsed() < WAIT, "took {:?}: {err}", start.elapsed());
    assert!(!format!("{err} {err:?}").contains("tls-s3cret"), "{err}");
}

#[tokio::test]
async fn tls_keys_need_a_rediss_url_and_readable_files() {
    let cases = [
        (
            "url = \"rediss://127.0.0.1:1\"\ntls_cert = \"c.pem\"",
            "cfg.toml: buses.main.tls_cert: tls_cert and tls_key go together",
        ),
        (
            "url = \"rediss://127.0.0.1:1\"\ntls_ca = \"/nonexistent/ca.pem\"",
            "cfg.toml: buses.main.tls_ca: cannot read \"/nonexistent/ca.pem\"",
        ),
    ];
    for (body, want) in cases {
        assert_refused(body, want).await;
    }
    let err = RedisBus::connect(config(
        "rediss://127.0.0.1:1".into(),
        Mode::Broadcast,
        Some("/nonexistent/ca.pem".into()),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(
        err.to_string()
            .starts_with("bus \"sec\": tls_ca: cannot read \"/nonexistent/ca.pem\""),
        "{err}"
    );
}
