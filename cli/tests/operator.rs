//! The CLI as a debugging tool on a live platform: `pub` from a file or stdin (any bytes, any
//! size, payloads starting with `-`), `tail --headers`, `--json` and `--group`, and
//! `request` / `reply` on Redis and NATS.

mod common;
use common::Spawned;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use busway_testkit::nats::NatsServer;
use busway_testkit::redis::RedisServer;

const WAIT: Duration = Duration::from_secs(30);

/// A config with one bus `main` (and the default route to it).
fn config(dir: &tempfile::TempDir, transport: &str, url: &str, mode: &str) -> String {
    let path = dir.path().join(format!("{transport}-{mode}.toml"));
    std::fs::write(
        &path,
        format!(
            "[buses.main]\ntransport = \"{transport}\"\nurl = \"{url}\"\nmode = \"{mode}\"\n[default]\nto = \"main\"\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// Runs `busway args` with `stdin` as its standard input; (success, stdout, stderr).
fn run_with_stdin(args: &[&str], stdin: &[u8]) -> (bool, Vec<u8>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_busway"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn pub_from_stdin_and_file_reaches_tail_json_byte_for_byte() {
    let test = "pub_from_stdin_and_file_reaches_tail_json_byte_for_byte";
    let Some(redis) = RedisServer::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir, "redis", &redis.url(), "broadcast");
    let mut tail = Spawned::start(&["tail", "x.>", "--config", &cfg, "--json", "--count", "3"]);
    tail.wait_stderr("busway: tailing", WAIT);

    // 300 KiB with NUL bytes, through stdin.
    let big: Vec<u8> = (0..300 * 1024).map(|i| (i % 128) as u8).collect();
    let (ok, _, err) = run_with_stdin(&["pub", "x.big", "--file", "-", "--config", &cfg], &big);
    assert!(ok, "{err}");
    // A payload that starts with '-', as an argument, no `--` needed.
    let (ok, _, err) = run_with_stdin(&["pub", "x.dash", "-42", "--config", &cfg], b"");
    assert!(ok, "{err}");
    // From a file, with a free header.
    let file = dir.path().join("payload.bin");
    std::fs::write(&file, b"\xff\x00bytes").unwrap();
    let (ok, _, err) = run_with_stdin(
        &[
            "pub",
            "x.file",
            "--file",
            file.to_str().unwrap(),
            "--header",
            "desk=fx",
            "--config",
            &cfg,
        ],
        b"",
    );
    assert!(ok, "{err}");

    let (code, stdout, stderr) = tail.finish(WAIT);
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let big_text = lines[0]["payload"].as_str().expect("valid UTF-8 payload");
    assert_eq!(lines[0]["topic"], "x.big");
    assert_eq!(big_text.len(), big.len());
    assert!(big.iter().zip(big_text.bytes()).all(|(a, b)| *a == b));
    assert_eq!(lines[1]["payload"], "-42");
    assert_eq!(lines[2]["payload_escaped"], "\\xff\\u{0}bytes");
    assert_eq!(lines[2]["headers"]["extra"][0][0], "desk");
    assert_eq!(lines[2]["attempt"], 1);
    assert!(lines[2]["headers"]["id"].is_string());
}

#[test]
fn tail_headers_and_groups() {
    let test = "tail_headers_and_groups";
    let Some(redis) = RedisServer::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir, "redis", &redis.url(), "stream");
    let mut a = Spawned::start(&["tail", "g.>", "--config", &cfg, "--group", "workers"]);
    let mut b = Spawned::start(&["tail", "g.>", "--config", &cfg, "--group", "workers"]);
    let mut h = Spawned::start(&["tail", "g.>", "--config", &cfg, "--headers", "--count", "1"]);
    for t in [&mut a, &mut b, &mut h] {
        t.wait_stderr("busway: tailing", WAIT);
    }
    for i in 0..20 {
        let (ok, _, err) = run_with_stdin(
            &[
                "pub",
                &format!("g.n{i}"),
                &format!("m{i}"),
                "--header",
                "desk=fx",
                "--config",
                &cfg,
            ],
            b"",
        );
        assert!(ok, "{err}");
    }
    let (code, out, err) = h.finish(WAIT);
    assert_eq!(code, Some(0), "{err}");
    // Topics are separate stream keys: which one comes first is not ordered.
    let first = out.lines().next().unwrap_or_default();
    let (topic, payload) = first.split_once(' ').unwrap();
    assert_eq!(
        topic.strip_prefix("g.n"),
        payload.strip_prefix('m'),
        "{out}"
    );
    assert!(out.contains("\n  desk: fx\n"), "{out}");
    assert!(out.contains("\n  source: busway\n"), "{out}");

    std::thread::sleep(Duration::from_secs(2));
    a.signal("-TERM");
    b.signal("-TERM");
    let (_, out_a, _) = a.finish(WAIT);
    let (_, out_b, _) = b.finish(WAIT);
    let (na, nb) = (out_a.lines().count(), out_b.lines().count());
    assert_eq!(
        na + nb,
        20,
        "the group got each message once:\n{out_a}\n--\n{out_b}"
    );
}

/// `busway reply` answers; `busway request` prints the answer: on Redis broadcast and NATS.
#[test]
fn request_and_reply_on_redis_and_nats() {
    let test = "request_and_reply_on_redis_and_nats";
    let Some(redis) = RedisServer::start(test) else {
        return;
    };
    let Some(nats) = NatsServer::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for cfg in [
        config(&dir, "redis", &redis.url(), "broadcast"),
        config(&dir, "nats", &nats.url(), "broadcast"),
    ] {
        let mut server = Spawned::start(&[
            "reply",
            "svc.*",
            "--config",
            &cfg,
            "--payload",
            "pong",
            "--count",
            "1",
        ]);
        server.wait_stderr("busway: replying", WAIT);
        let (ok, out, err) = run_with_stdin(&["request", "svc.ping", "hi", "--config", &cfg], b"");
        assert!(ok, "{cfg}: {err}");
        assert_eq!(out, b"pong\n", "{cfg}");
        let (code, _, err) = server.finish(WAIT);
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("svc.ping hi"), "{err}");

        // Echo, and a request nobody answers times out naming the topic.
        let mut echo = Spawned::start(&["reply", "svc.*", "--config", &cfg, "--count", "1"]);
        echo.wait_stderr("busway: replying", WAIT);
        let (ok, out, err) = run_with_stdin(
            &["request", "svc.echo", "--file", "-", "--config", &cfg],
            b"abc",
        );
        assert!(ok, "{cfg}: {err}");
        assert_eq!(out, b"abc\n");
        echo.finish(WAIT);
        let (ok, _, err) = run_with_stdin(
            &[
                "request",
                "svc.nobody",
                "x",
                "--timeout",
                "0.5",
                "--config",
                &cfg,
            ],
            b"",
        );
        assert!(!ok);
        assert!(err.contains("svc.nobody"), "{err}");
    }
}
