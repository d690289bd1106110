//! `busway-bench` end to end: the real binary, private brokers it starts itself, and the JSON
//! lines a user would feed to a script. No timing assertions: only that both sides ran, every
//! message arrived and the figures are there.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs `busway-bench args...`, killing it after `limit` so a hang fails the test instead of
/// stalling the suite. Returns (success, stdout, stderr).
fn busway_bench(args: &[&str], limit: Duration) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_busway-bench"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start busway-bench");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for busway-bench") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "busway-bench {args:?} did not finish within {limit:?}; stderr:\n{}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status.success(),
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

fn number(v: &Value, path: &[&str]) -> f64 {
    let mut at = v;
    for key in path {
        at = &at[*key];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("{} is not a number in {v}", path.join(".")))
}

/// Runs `busway-bench args` (a `--json` command), which must succeed; its output lines, parsed.
fn json_lines(args: &[&str], timeout: Duration) -> Vec<Value> {
    let (ok, stdout, stderr) = busway_bench(args, timeout);
    assert!(ok, "busway-bench {args:?} failed:\n{stdout}\n{stderr}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

/// Runs a JSON bench and checks every line: both sides measured, nothing lost, a ratio.
/// Returns the lines by shape.
fn bench_json(args: &[&str], shapes: &[&str], broker_cpu: bool) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let lines = json_lines(&all, Duration::from_secs(300));
    let stdout = format!("{lines:?}");
    let got: Vec<&str> = lines
        .iter()
        .map(|l| l["shape"].as_str().expect("shape"))
        .collect();
    assert_eq!(got, shapes, "{stdout}");
    for line in &lines {
        for side in ["busway", "raw"] {
            let s = &line[side];
            assert_eq!(s["lost"], 0, "{side} lost messages: {line}");
            assert_eq!(s["errors"], 0, "{side} had errors: {line}");
            assert_eq!(s["delivered"], s["expected_deliveries"], "{line}");
            assert!(number(line, &[side, "published"]) > 0.0, "{line}");
            assert!(number(line, &[side, "msgs_per_s"]) > 0.0, "{line}");
            assert!(s["what"].as_str().is_some_and(|w| !w.is_empty()), "{line}");
            if broker_cpu {
                assert!(
                    number(line, &[side, "broker_cpu_s_per_million"]) >= 0.0,
                    "{line}"
                );
            } else {
                assert!(s["broker_cpu_s_per_million"].is_null(), "{line}");
            }
        }
        assert!(number(line, &["ratio"]) > 0.0, "{line}");
        let subs = number(line, &["subscribers"]);
        assert_eq!(
            number(line, &["busway", "expected_deliveries"]),
            number(line, &["busway", "published"]) * subs,
            "every subscriber must get every message: {line}"
        );
        if line["shape"] == "latency" {
            for side in ["busway", "raw"] {
                let p50 = number(line, &[side, "p50_us"]);
                let p99 = number(line, &[side, "p99_us"]);
                let p999 = number(line, &[side, "p999_us"]);
                assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{line}");
            }
            assert!(number(line, &["p99_ratio"]) > 0.0, "{line}");
        }
    }
    lines
}

const ALL: [&str; 5] = ["publish", "pubsub", "fanout", "fanin", "latency"];

#[test]
fn memory_all_shapes_report_both_sides_and_a_ratio() {
    let lines = bench_json(
        &[
            "--transport",
            "memory",
            "--shape",
            "all",
            "--count",
            "20000",
        ],
        &ALL,
        false,
    );
    let fanout = &lines[2];
    assert_eq!(fanout["subscribers"], 7);
    assert_eq!(fanout["busway"]["delivered"], 7 * 20000);
    assert_eq!(lines[3]["publishers"], 7);
}

/// `--shape latency --publishers P --subscribers S`: every subscriber gets every message and
/// the percentiles cover all their deliveries.
fn latency_fan_out(transport: &str, raw: &str) {
    let lines = bench_json(
        &[
            "--transport",
            transport,
            "--shape",
            "latency",
            "--publishers",
            "2",
            "--subscribers",
            "3",
            "--rate",
            "2000",
            "--count",
            "2000",
        ],
        &["latency"],
        transport != "memory",
    );
    let line = &lines[0];
    assert_eq!(line["publishers"], 2, "{line}");
    assert_eq!(line["subscribers"], 3, "{line}");
    assert_eq!(line["busway"]["delivered"], 3 * 2000, "{line}");
    for side in ["busway", "raw"] {
        assert_eq!(number(line, &[side, "latency_samples"]), 6000.0, "{line}");
    }
    let what = line["raw"]["what"].as_str().unwrap_or_default();
    assert!(what.contains(raw), "{line}");
}

#[test]
fn memory_latency_to_several_subscribers() {
    latency_fan_out("memory", "tokio::sync::broadcast");
}

#[test]
fn memory_stream_mode_acks_every_delivery() {
    let lines = bench_json(
        &[
            "--transport",
            "memory",
            "--mode",
            "stream",
            "--shape",
            "pubsub",
            "--count",
            "5000",
        ],
        &["pubsub"],
        false,
    );
    assert_eq!(lines[0]["mode"], "stream");
}

#[test]
fn table_output_names_both_sides() {
    let (ok, stdout, stderr) = busway_bench(
        &[
            "--transport",
            "memory",
            "--shape",
            "pubsub",
            "--count",
            "2000",
        ],
        Duration::from_secs(120),
    );
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("pubsub   busway"), "{stdout}");
    assert!(stdout.contains("pubsub   raw"), "{stdout}");
    assert!(stdout.contains("2000/2000"), "{stdout}");
    assert!(stdout.contains("crossbeam bounded(1024)"), "{stdout}");
}

#[test]
fn repeat_measures_each_shape_again_and_ends_with_the_median_ratio() {
    let args = [
        "--json",
        "--transport",
        "memory",
        "--shape",
        "pubsub",
        "--count",
        "2000",
        "--repeat",
        "3",
    ];
    let lines = json_lines(&args, Duration::from_secs(120));
    assert_eq!(lines.len(), 4, "three runs and a summary: {lines:?}");
    let ratios: Vec<f64> = lines[..3].iter().map(|l| number(l, &["ratio"])).collect();
    let summary = &lines[3];
    assert_eq!(summary["shape"], "pubsub");
    assert_eq!(summary["runs"], 3);
    let listed: Vec<f64> = summary["ratios"]
        .as_array()
        .expect("ratios")
        .iter()
        .map(|v| v.as_f64().expect("a ratio"))
        .collect();
    assert_eq!(listed, ratios, "{summary}");
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(number(summary, &["median_ratio"]), sorted[1], "{summary}");

    let (ok, _, stderr) = busway_bench(
        &["--transport", "memory", "--repeat", "0"],
        Duration::from_secs(60),
    );
    assert!(!ok);
    assert!(stderr.contains("--repeat"), "{stderr}");
}

/// The SVG file `name` in `dir`, parsed: its elements' tag names and its text.
fn svg(dir: &std::path::Path, name: &str) -> (Vec<String>, String) {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} was not written: {e}", path.display()));
    let doc = roxmltree::Document::parse(&text)
        .unwrap_or_else(|e| panic!("{} is not valid XML: {e}", path.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg", "{name}");
    let tags = doc
        .descendants()
        .filter(|n| n.is_element())
        .map(|n| n.tag_name().name().to_string())
        .collect();
    let words = doc
        .descendants()
        .filter_map(|n| n.text())
        .collect::<Vec<_>>()
        .join("|");
    (tags, words)
}

fn count(tags: &[String], tag: &str) -> usize {
    tags.iter().filter(|t| *t == tag).count()
}

/// How many `polyline`s of the SVG file `name` in `dir` go through at least `points` points
/// (a curve, not an axis tick or a legend line).
fn curves(dir: &std::path::Path, name: &str, points: usize) -> usize {
    let text = std::fs::read_to_string(dir.join(name)).expect("the chart");
    let doc = roxmltree::Document::parse(&text).expect("valid XML");
    doc.descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .filter(|n| {
            n.attribute("points")
                .unwrap_or("")
                .split_whitespace()
                .count()
                >= points
        })
        .count()
}

/// `--plot DIR` on a short memory run of every shape, twice: a throughput chart with a bar,
/// a range and a dot per run for each side of each shape, and the latency shape's percentile
/// curves, one per side and run; nothing but the JSON lines on stdout and nothing on stderr
/// (no progress bar when piped).
#[test]
fn plot_writes_svg_charts_and_memory_reports_in_runtime_baselines() {
    let dir = tempfile::tempdir().expect("temp dir");
    let plot = dir.path().join("charts");
    let args = [
        "--json",
        "--transport",
        "memory",
        "--count",
        "3000",
        "--rate",
        "3000",
        "--repeat",
        "2",
        "--plot",
        plot.to_str().expect("utf-8 path"),
    ];
    let (ok, stdout, stderr) = busway_bench(&args, Duration::from_secs(300));
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stderr.is_empty(),
        "nothing on stderr when piped: {stderr:?}"
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    // Five shapes twice, then five medians.
    assert_eq!(lines.len(), 15, "{stdout}");

    // Into one subscriber, the in-runtime channels are measured beside crossbeam.
    for line in lines[..10]
        .iter()
        .filter(|l| l["shape"] == "pubsub" || l["shape"] == "fanin")
    {
        let baselines = line["baselines"].as_array().expect("baselines");
        let names: Vec<&str> = baselines
            .iter()
            .filter_map(|b| b["name"].as_str())
            .collect();
        assert_eq!(names, ["tokio mpsc", "flume"], "{line}");
        for b in baselines {
            assert_eq!(b["lost"], 0, "{line}");
            assert_eq!(b["delivered"], b["expected_deliveries"], "{line}");
            assert!(number(b, &["msgs_per_s"]) > 0.0, "{line}");
        }
        let best = baselines
            .iter()
            .map(|b| number(b, &["msgs_per_s"]))
            .fold(0.0, f64::max);
        let fair = number(line, &["in_runtime_ratio"]);
        let expected = number(line, &["busway", "msgs_per_s"]) / best;
        assert!((fair - expected).abs() <= 1e-9 * expected, "{line}");
    }
    let fanout = lines
        .iter()
        .find(|l| l["shape"] == "fanout")
        .expect("fanout");
    assert_eq!(fanout["baselines"].as_array().map(Vec::len), Some(0));
    assert!(fanout["in_runtime_ratio"].is_null(), "{fanout}");

    let (tags, words) = svg(&plot, "memory-broadcast-throughput.svg");
    // Bars: publish and fanout 2 sides each, pubsub and fanin 4; a dot per run of each bar.
    let bars = 2 + 4 + 2 + 4;
    assert_eq!(count(&tags, "circle"), 2 * bars, "{words}");
    assert!(count(&tags, "rect") > bars, "{tags:?}");
    for word in [
        "busway",
        "crossbeam threads",
        "tokio broadcast",
        "tokio mpsc",
        "flume",
        "publish (1->0)",
        "pubsub (1->1)",
        "fanout (1->7)",
        "fanin (7->1)",
        "M msgs/s",
    ] {
        assert!(words.contains(word), "{word:?} missing: {words}");
    }
    assert!(!words.contains("latency"), "{words}");

    let (_, words) = svg(&plot, "memory-broadcast-latency.svg");
    // A curve through the 38 percentiles per side and run.
    assert_eq!(
        curves(&plot, "memory-broadcast-latency.svg", 38),
        2 * 2,
        "{words}"
    );
    for word in [
        "busway",
        "tokio mpsc",
        "p99",
        "percentile",
        "delay, µs",
        "3000 msgs/s",
    ] {
        assert!(words.contains(word), "{word:?} missing: {words}");
    }
}

#[test]
fn bad_options_are_refused_with_a_reason() {
    let (ok, _, stderr) = busway_bench(
        &["--transport", "memory", "--payload", "0"],
        Duration::from_secs(60),
    );
    assert!(!ok);
    assert!(
        stderr.contains("--payload must be at least 1 byte"),
        "{stderr}"
    );
    let (ok, _, stderr) = busway_bench(&["scenario", "--md-burst", "0"], Duration::from_secs(60));
    assert!(!ok);
    assert!(stderr.contains("--md-burst"), "{stderr}");
    let (ok, _, stderr) = busway_bench(&["scenario", "--repeat", "0"], Duration::from_secs(60));
    assert!(!ok);
    assert!(stderr.contains("--repeat"), "{stderr}");
}

fn broker_present(binary: &str, test: &str) -> bool {
    busway_testkit::broker_binary(binary, test).is_some()
}

#[test]
fn redis_broadcast_all_shapes_with_broker_cpu() {
    if !broker_present("redis-server", "redis_broadcast_all_shapes_with_broker_cpu") {
        return;
    }
    bench_json(
        &["--transport", "redis", "--shape", "all", "--count", "5000"],
        &ALL,
        true,
    );
}

#[test]
fn redis_stream_mode_with_acks() {
    if !broker_present("redis-server", "redis_stream_mode_with_acks") {
        return;
    }
    bench_json(
        &[
            "--transport",
            "redis",
            "--mode",
            "stream",
            "--shape",
            "all",
            "--count",
            "3000",
        ],
        &ALL,
        true,
    );
}

#[test]
fn nats_broadcast_all_shapes_with_broker_cpu() {
    if !broker_present("nats-server", "nats_broadcast_all_shapes_with_broker_cpu") {
        return;
    }
    bench_json(
        &["--transport", "nats", "--shape", "all", "--count", "5000"],
        &ALL,
        true,
    );
}

#[test]
fn redis_latency_to_several_subscribers() {
    if !broker_present("redis-server", "redis_latency_to_several_subscribers") {
        return;
    }
    latency_fan_out("redis", "3 pub/sub connection(s)");
}

#[test]
fn nats_latency_to_several_subscribers() {
    if !broker_present("nats-server", "nats_latency_to_several_subscribers") {
        return;
    }
    latency_fan_out("nats", "3 subscription(s)");
}

#[test]
fn nats_jetstream_with_acks() {
    if !broker_present("nats-server", "nats_jetstream_with_acks") {
        return;
    }
    bench_json(
        &[
            "--transport",
            "nats",
            "--mode",
            "stream",
            "--shape",
            "all",
            "--count",
            "3000",
        ],
        &ALL,
        true,
    );
}

/// `busway-bench scenario --json` with little traffic (5 symbols, 200 market-data and 10 logic
/// messages per second) and `extra` options; its output lines.
fn small_scenario(extra: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "scenario",
        "--json",
        "--md-rate",
        "200",
        "--logic-rate",
        "10",
        "--symbols",
        "5",
        "--drain",
        "10",
    ];
    args.extend_from_slice(extra);
    json_lines(&args, Duration::from_secs(300))
}

#[test]
fn scenario_repeat_ends_with_the_median_of_each_comparison() {
    let name = "scenario_repeat_ends_with_the_median_of_each_comparison";
    if !broker_present("redis-server", name) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let plot = dir.path().to_str().expect("utf-8 path");
    let lines = small_scenario(&[
        "--setups",
        "before,dual-bus",
        "--repeat",
        "2",
        "--seconds",
        "1",
        "--plot",
        plot,
    ]);
    // Per run: the two set-ups and the comparison; then the medians.
    assert_eq!(lines.len(), 7, "{lines:?}");
    for run in [&lines[0..3], &lines[3..6]] {
        assert_eq!(run[0]["setup"], "before", "{run:?}");
        assert_eq!(run[1]["setup"], "dual_bus", "{run:?}");
        assert_eq!(run[2]["compare"], "dual_bus", "{run:?}");
    }
    let medians = &lines[6];
    assert_eq!(medians["medians"], "dual_bus", "{medians}");
    assert_eq!(medians["runs"], 2, "{medians}");
    for key in ["broker_cpu_per_million_x_less", "p99_x_lower"] {
        let a = number(&lines[2], &[key]);
        let b = number(&lines[5], &[key]);
        let m = &medians[key];
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * x.abs().max(1.0);
        assert!(
            close(number(m, &["median"]), (a + b) / 2.0),
            "{key}: {medians}"
        );
        assert!(close(number(m, &["min"]), a.min(b)), "{key}: {medians}");
        assert!(close(number(m, &["max"]), a.max(b)), "{key}: {medians}");
    }
    // `--plot`: broker CPU and p99 per set-up, a dot per run.
    let (tags, words) = svg(dir.path(), "scenario.svg");
    assert_eq!(count(&tags, "circle"), 2 * 2 * 2, "{tags:?}");
    for word in ["before", "dual_bus", "CPU s / M msgs", "p99", "2 runs"] {
        assert!(words.contains(word), "{word:?} missing: {words}");
    }
}

#[test]
fn scenario_reports_three_setups_and_the_comparison() {
    if !broker_present(
        "redis-server",
        "scenario_reports_three_setups_and_the_comparison",
    ) || !broker_present(
        "nats-server",
        "scenario_reports_three_setups_and_the_comparison",
    ) {
        return;
    }
    let lines = small_scenario(&["--seconds", "2", "--md-burst", "5"]);
    assert_eq!(lines.len(), 5, "{lines:?}");
    for (line, setup) in lines.iter().zip(["before", "dual_bus", "off_redis"]) {
        assert_eq!(line["setup"], setup, "{line}");
        assert!(number(line, &["published"]) > 0.0, "{line}");
        assert_eq!(line["delivered"], line["expected_deliveries"], "{line}");
        assert_eq!(line["errors"], 0, "{line}");
        assert!(
            number(line, &["p99_us"]) >= number(line, &["p50_us"]),
            "{line}"
        );
        assert!(number(line, &["total_broker_cpu_s"]) >= 0.0, "{line}");
        let brokers = line["brokers"].as_array().expect("brokers");
        assert_eq!(brokers[0]["role"], "main redis", "{line}");
        assert!(number(&brokers[0], &["cpu_s"]) >= 0.0, "{line}");
    }
    // before: 8 processes (feed + 7 engines) x 3 connections on the main Redis.
    assert_eq!(lines[0]["brokers"][0]["connections"], 24, "{}", lines[0]);
    for busway_setup in &lines[1..3] {
        let brokers = busway_setup["brokers"].as_array().expect("brokers");
        assert_eq!(brokers.len(), 3, "{busway_setup}");
        assert_eq!(
            brokers[0]["connections"], 0,
            "main Redis carries nothing: {busway_setup}"
        );
        for b in &brokers[1..] {
            assert!(number(b, &["connections"]) > 0.0, "{busway_setup}");
        }
    }
    // Dual bus on Redis: per process one command connection on each bus, one pub/sub
    // connection per market-data subscriber process (5), and on the engine bus one reader
    // per consumer group in use per process: each of the 5 consuming engines reads its 7
    // stream subscriptions between them in its own group (ml, strategy, portfolio,
    // collateral, websocket).
    assert_eq!(lines[1]["brokers"][1]["connections"], 8 + 5, "{}", lines[1]);
    assert_eq!(lines[1]["brokers"][2]["connections"], 8 + 5, "{}", lines[1]);
    // NATS: one connection per process and bus.
    assert_eq!(lines[2]["brokers"][1]["connections"], 8, "{}", lines[2]);
    assert_eq!(lines[2]["brokers"][2]["connections"], 8, "{}", lines[2]);
    for (line, setup) in lines[3..].iter().zip(["dual_bus", "off_redis"]) {
        assert_eq!(line["compare"], setup, "{line}");
        assert_eq!(line["main_redis_engine_connections"], 0, "{line}");
        assert!(
            number(line, &["main_redis_cpu_reduction_pct"]).is_finite(),
            "{line}"
        );
    }
}
