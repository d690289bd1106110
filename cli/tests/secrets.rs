//! No password, token or other credential appears in what the `busway` command prints:
//! `check` on a good config and on bad ones, `pub` to a broker that refuses the password.

use std::process::{Command, Stdio};

const SECRETS: [&str; 5] = [
    "Url-pa55word",
    "Nats-t0ken-in-url",
    "Opt-t0ken-value",
    "Opt-pa55word-value",
    "Nkey-seed-value",
];

/// Runs `busway args` and returns stdout + stderr (it must finish: no broker is reachable).
fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_busway"))
        .args(args)
        .env_remove("BUSWAY_TRANSPORT")
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .output()
        .expect("run busway");
    (
        out.status.success(),
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{what}: {secret} printed:\n{text}");
    }
}

const GOOD: &str = r#"
[buses.engine]
transport = "redis"
url = "redis://svc:Url-pa55word@127.0.0.1:1/0"

[buses.md]
transport = "nats"
url = "nats://Nats-t0ken-in-url@127.0.0.1:1"

[buses.tok]
transport = "nats"
url = "nats://127.0.0.1:1"
token = "Opt-t0ken-value"

[buses.up]
transport = "nats"
url = "nats://127.0.0.1:1"
user = "alice"
password = "Opt-pa55word-value"

[[routes]]
match = "engine.>"
to = "engine"

[default]
to = "md"
"#;

#[test]
fn check_and_pub_never_print_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("platform.toml");
    std::fs::write(&good, GOOD).unwrap();
    let good = good.to_str().unwrap();

    let (ok, text) = run(&["check", good]);
    assert!(ok, "check of a good config failed:\n{text}");
    assert!(
        text.contains("svc:***@"),
        "the URL is shown redacted:\n{text}"
    );
    assert_no_secret("check", &text);

    // Configs whose error messages quote the URL or sit next to secrets.
    let bads = [
        GOOD.replace("redis://svc:", "http://svc:"),
        GOOD.replace("nats://Nats-t0ken-in-url@", "redis://Nats-t0ken-in-url@"),
        GOOD.replace("user = \"alice\"\n", ""),
        GOOD.replace("token = ", "tokn = "),
        // A malformed NKey seed is refused when the config is checked: without quoting it.
        GOOD.replace(
            "password = \"Opt-pa55word-value\"",
            "password = \"Opt-pa55word-value\"\nnkey = \"Nkey-seed-value\"",
        ),
        GOOD.replace(
            "redis://svc:Url-pa55word@127.0.0.1:1/0",
            "redis://svc:Url-pa55word@127.0.0.1:notaport",
        ),
        // A Sentinel URL without its master name.
        GOOD.replace(
            "redis://svc:Url-pa55word@127.0.0.1:1/0",
            "redis+sentinel://svc:Url-pa55word@127.0.0.1:1,127.0.0.1:2",
        ),
    ];
    for (i, bad) in bads.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, bad).unwrap();
        let (_, text) = run(&["check", path.to_str().unwrap()]);
        assert_no_secret(&format!("check bad{i}"), &text);
    }

    // Connecting fails (nothing listens on port 1): the error names the bus, not the secret.
    let (ok, text) = run(&["pub", "engine.x", "hello", "--config", good]);
    assert!(!ok, "pub to a dead broker succeeded:\n{text}");
    assert_no_secret("pub", &text);
}

/// Every place a credential can sit in a Redis URL (userinfo, `password=` / `pass=` query
/// parameters, on TCP and on a Unix socket), sent through every command against a server
/// that refuses it: the secret never shows, on stdout or stderr, at `trace` logging.
#[test]
fn secrets_in_any_url_form_never_print_from_any_command() {
    use busway_testkit::redis::RedisServer;
    let test = "secrets_in_any_url_form_never_print_from_any_command";
    let Some(redis) = RedisServer::start_with_password(test, "the-right-one") else {
        return;
    };
    let port = redis.port();
    let secret = "Wr0ng-s3cret";
    let dir = tempfile::tempdir().unwrap();
    let urls = [
        format!("redis://:{secret}@127.0.0.1:{port}"),
        format!("redis://default:{secret}@127.0.0.1:{port}/0"),
        format!("redis://127.0.0.1:{port}/0?password={secret}"),
        format!("redis://127.0.0.1:{port}/0?protocol=resp3&password={secret}"),
        format!("redis+unix://{}/r.sock?pass={secret}", dir.path().display()),
        format!("unix://{}/r.sock?password={secret}", dir.path().display()),
        // Sentinel URLs: a "sentinel" that refuses the unauthenticated lookup, and none.
        format!("redis+sentinel://default:{secret}@127.0.0.1:{port}/mymaster"),
        format!("redis+sentinel://app:{secret}@127.0.0.1:1,127.0.0.1:2/mymaster?db=1"),
    ];
    for (i, url) in urls.iter().enumerate() {
        let cfg = dir.path().join(format!("c{i}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[buses.main]\ntransport = \"redis\"\nurl = \"{url}\"\n[default]\nto = \"main\"\n"
            ),
        )
        .unwrap();
        let cfg = cfg.to_str().unwrap();
        let runs: [&[&str]; 4] = [
            &["check", cfg],
            &["pub", "x.y", "hello", "--config", cfg],
            &["tail", "x.>", "--config", cfg, "--timeout", "1"],
            &["audit", url],
        ];
        for args in runs {
            let (_, text) = run(args);
            assert!(
                !text.contains(secret),
                "{args:?} printed the secret of {url}:\n{text}"
            );
        }
    }
}
