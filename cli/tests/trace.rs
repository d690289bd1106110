//! Traces as a collector sees them: spans recorded by an in-process `tracing` layer while
//! the seven-engine demo runs in memory, and trace context in headers at the edges
//! (no `traceparent`, a malformed one).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busway::trace::{self, TraceContext, TRACEPARENT};
use busway::{Bus, MemoryBus, Message, Pattern, Router, SubscribeOptions, Topic};
use busway_cli::demo::{self, DemoOptions};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// One recorded span: its name and string fields.
#[derive(Debug, Clone)]
struct Recorded {
    name: String,
    fields: BTreeMap<String, String>,
}

/// The in-process collector: every busway span created, with the fields recorded later.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<(Id, Recorded)>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Collector {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
        if attrs.metadata().target() != trace::TARGET {
            return;
        }
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let name = attrs.metadata().name().to_string();
        self.0
            .lock()
            .unwrap()
            .push((id.clone(), Recorded { name, fields }));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        let mut spans = self.0.lock().unwrap();
        // Span ids are reused once a span closes: the latest span with this id is the one.
        if let Some((_, span)) = spans.iter_mut().rev().find(|(i, _)| i == id) {
            values.record(&mut Fields(&mut span.fields));
        }
    }
}

impl Collector {
    fn spans(&self) -> Vec<Recorded> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }
}

/// Runs `f` on a current-thread runtime with the collector as the thread's subscriber (the
/// demo's tasks run on this thread, so they see it too).
fn collected<F: std::future::Future>(f: F) -> (F::Output, Collector) {
    let collector = Collector::default();
    let subscriber = tracing_subscriber::registry().with(collector.clone());
    let _default = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (rt.block_on(f), collector)
}

#[test]
fn one_quote_is_one_trace_through_at_least_four_engines() {
    let options = DemoOptions {
        duration: Duration::from_millis(300),
        symbols: 2,
        rate: 10.0,
        ..DemoOptions::default()
    };
    let (report, collector) =
        collected(async { demo::run(&options, &busway_cli::registry()).await });
    let report = report.expect("the demo runs");
    assert!(report.pass, "{report}");
    let spans = collector.spans();

    // Per trace: the root publishes (no parent) and the engines that handled it.
    let mut roots: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut engines: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in &spans {
        let trace_id = s.fields["trace_id"].clone();
        match s.name.as_str() {
            "busway.publish" if s.fields["parent_span_id"].is_empty() => {
                roots
                    .entry(trace_id)
                    .or_default()
                    .push(s.fields["topic"].clone());
            }
            "busway.handle" => {
                engines
                    .entry(trace_id)
                    .or_default()
                    .insert(s.fields["handler"].clone());
            }
            _ => {}
        }
    }
    let (trace_id, handlers) = engines
        .iter()
        .max_by_key(|(_, e)| e.len())
        .expect("some handled spans");
    assert!(
        handlers.len() >= 4,
        "the longest trace crosses {handlers:?} only"
    );
    let root = &roots[trace_id];
    assert_eq!(root.len(), 1, "one message starts the trace: {root:?}");
    assert!(
        root[0].starts_with("marketdata."),
        "started by market data: {root:?}"
    );
    // Every span id is unique, and every parent is a span of the same trace.
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.fields["span_id"].as_str()).collect();
    assert_eq!(ids.len(), spans.len(), "span ids are unique");
    for s in spans.iter().filter(|s| &s.fields["trace_id"] == trace_id) {
        let parent = s.fields["parent_span_id"].as_str();
        assert!(
            parent.is_empty() || ids.contains(parent),
            "{s:?} has a known parent"
        );
    }
}

async fn publish_one(headers: &[(&str, &str)]) -> Message {
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new("md"));
    let router = Router::builder()
        .bus("md", bus)
        .default_to(&["md"])
        .build()
        .unwrap();
    let mut sub = router
        .subscribe(Pattern::new("t.>").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    let mut m = Message::new(Topic::new("t.one").unwrap(), "x");
    for (k, v) in headers {
        m.headers.insert(*k, *v);
    }
    router
        .publish(m)
        .await
        .expect("a publish never fails for its trace header");
    let d = sub.recv().await.expect("delivered");
    d.into_message()
}

#[test]
fn a_message_without_traceparent_starts_a_trace_and_a_valid_one_is_continued() {
    let (got, collector) = collected(publish_one(&[]));
    let ctx = TraceContext::from_headers(&got.headers).expect("a traceparent was added");
    let spans = collector.spans();
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].fields["trace_id"], ctx.trace_id_hex());
    assert_eq!(spans[0].fields["parent_span_id"], "");

    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (got, collector) = collected(publish_one(&[(TRACEPARENT, parent), ("tracestate", "a=1")]));
    let ctx = TraceContext::from_headers(&got.headers).unwrap();
    assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(
        ctx.span_id_hex(),
        "00f067aa0ba902b7",
        "the receiver's parent is the publish span"
    );
    assert_eq!(got.headers.get("tracestate"), Some("a=1"));
    assert_eq!(
        collector.spans()[0].fields["parent_span_id"],
        "00f067aa0ba902b7"
    );
}

#[test]
fn a_malformed_traceparent_is_ignored_and_counted_never_an_error() {
    let before = trace::malformed_count();
    let (got, collector) = collected(publish_one(&[(TRACEPARENT, "00-not-a-trace-01")]));
    assert!(trace::malformed_count() > before, "counted");
    let ctx = TraceContext::from_headers(&got.headers).expect("replaced by a new trace");
    let spans = collector.spans();
    assert_eq!(spans[0].fields["trace_id"], ctx.trace_id_hex());
    assert_eq!(spans[0].fields["parent_span_id"], "", "a new trace");
    // Handling a message with a malformed header starts a trace too.
    let mut m = Message::new(Topic::new("t.two").unwrap(), "x");
    m.headers.insert(TRACEPARENT, "zz");
    let ((), collector) = collected(async {
        let h = trace::handling(&m, "engine");
        assert!(h.context().is_some());
    });
    assert_eq!(collector.spans()[0].fields["parent_span_id"], "");
}
