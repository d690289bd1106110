//! W3C trace context in message headers, and the `tracing` spans of a publish and of the
//! handling of a delivery, so one trace follows a message across engines, buses and
//! transports.
//!
//! # Headers
//! [`TRACEPARENT`] (`00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`) and
//! [`TRACESTATE`] travel as free headers ([`Headers::get`]), so every transport that carries
//! headers carries them. A `traceparent` that does not parse is ignored (as if absent),
//! counted in [`malformed_count`] and the `busway_trace_malformed_total` metric, and never
//! an error: a foreign or broken header must not cost a message.
//!
//! # Spans
//! - `busway.publish` (made by [`Router`](crate::Router)'s `publish` when a `tracing`
//!   subscriber wants INFO spans of target `busway::trace`): continues the message's trace, or
//!   starts one when the message has no valid `traceparent`, and rewrites the header so the
//!   receiver's parent is this span. Fields: `trace_id`, `span_id`, `parent_span_id` (empty
//!   for a new trace), `topic`, `bus`.
//! - `busway.handle` ([`handling`]): made by the consumer around its work on a delivery; the
//!   messages it publishes in response carry its context ([`Handling::propagate`]).
//!   Fields: `trace_id`, `span_id`, `parent_span_id`, `topic`, and `handler` (the name the
//!   caller gives).
//!
//! # OpenTelemetry
//! With the `otel` cargo feature and `tracing-opentelemetry`'s layer installed, both spans
//! join OpenTelemetry: the incoming `traceparent` is the span's remote parent, and the ids
//! recorded and written to the outgoing header are the OpenTelemetry span's own, so exported
//! traces and headers agree (docs/OBSERVABILITY.md shows the wiring with an OTLP exporter).
//! Without the layer busway draws the ids itself.
//!
//! With no subscriber interested, nothing is generated: headers pass through unchanged (a
//! handler still forwards the incoming context), so a process without tracing does not break
//! a trace that crosses it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tracing::Span;

use crate::message::{Headers, Message};

/// The header carrying the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// The header carrying the W3C vendor trace state.
pub const TRACESTATE: &str = "tracestate";
/// The `tracing` target of busway's spans.
pub const TARGET: &str = "busway::trace";

static MALFORMED: AtomicU64 = AtomicU64::new(0);

/// `traceparent` headers that did not parse and were ignored, in this process.
pub fn malformed_count() -> u64 {
    MALFORMED.load(Relaxed)
}

/// A W3C trace context: which trace a message belongs to and which span it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace id (never zero).
    pub trace_id: u128,
    /// The id of the span this context points to (never zero).
    pub span_id: u64,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
    /// The `tracestate` header, carried as is.
    pub state: Option<String>,
}

impl TraceContext {
    /// A new trace with a random id, sampled.
    pub fn new_root() -> TraceContext {
        TraceContext {
            trace_id: nonzero(rand::random()),
            span_id: nonzero(rand::random()),
            flags: 1,
            state: None,
        }
    }

    /// A new span in the same trace.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: nonzero(rand::random()),
            ..self.clone()
        }
    }

    /// Parses a `traceparent` value (version 00, or a later version's first four fields).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        let v = traceparent.trim();
        let mut parts = v.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        };
        if !hex(version, 2)
            || version == "ff"
            || !hex(trace, 32)
            || !hex(span, 16)
            || !hex(flags, 2)
        {
            return None;
        }
        // Version 00 has exactly four fields; later versions may append more.
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags: u8::from_str_radix(flags, 16).ok()?,
            state: tracestate.map(str::to_string),
        })
    }

    /// The context in `headers`: `None` when there is no `traceparent`, or when it is
    /// malformed (then counted, see the module docs).
    pub fn from_headers(headers: &Headers) -> Option<TraceContext> {
        let tp = headers.get(TRACEPARENT)?;
        let parsed = TraceContext::parse(tp, headers.get(TRACESTATE));
        if parsed.is_none() {
            MALFORMED.fetch_add(1, Relaxed);
            ::metrics::counter!(crate::metrics::TRACE_MALFORMED).increment(1);
        }
        parsed
    }

    /// Writes `traceparent` (and `tracestate` when set) into `headers`.
    pub fn inject(&self, headers: &mut Headers) {
        headers.insert(TRACEPARENT, self.to_string());
        if let Some(state) = &self.state {
            headers.insert(TRACESTATE, state.clone());
        }
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

impl fmt::Display for TraceContext {
    /// The `traceparent` value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

fn nonzero<T: PartialEq + From<u8>>(v: T) -> T {
    if v == T::from(0) {
        T::from(1)
    } else {
        v
    }
}

/// Whether a subscriber wants busway's spans (a callsite check: nearly free when not).
#[inline]
pub(crate) fn spans_enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// The `busway.publish` span for `message`, whose `traceparent` it rewrites to point at the
/// span (continuing the message's trace, or starting one). `Span::none()` when no subscriber
/// wants it.
pub(crate) fn publish_span(message: &mut Message) -> Span {
    if !spans_enabled() {
        return Span::none();
    }
    let parent = TraceContext::from_headers(&message.headers);
    let span = tracing::info_span!(
        target: TARGET,
        "busway.publish",
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_span_id = %parent.as_ref().map(TraceContext::span_id_hex).unwrap_or_default(),
        topic = %message.topic,
        bus = tracing::field::Empty,
    );
    let ctx = identify(&span, parent.as_ref());
    ctx.inject(&mut message.headers);
    span
}

/// The context of a new `span` whose parent is `parent` (a new trace when `None`), recorded
/// in its `trace_id` and `span_id` fields. With the `otel` feature and the OpenTelemetry
/// layer installed, the span joins the parent's OpenTelemetry trace and the ids are
/// OpenTelemetry's own, so an exporter and the headers agree; otherwise busway draws them.
fn identify(span: &Span, parent: Option<&TraceContext>) -> TraceContext {
    let ctx = otel::link(span, parent)
        .unwrap_or_else(|| parent.map_or_else(TraceContext::new_root, TraceContext::child));
    span.record("trace_id", ctx.trace_id_hex());
    span.record("span_id", ctx.span_id_hex());
    ctx
}

#[cfg(not(feature = "otel"))]
mod otel {
    use super::{Span, TraceContext};

    /// Without the `otel` feature there is no OpenTelemetry span to follow.
    pub(super) fn link(_: &Span, _: Option<&TraceContext>) -> Option<TraceContext> {
        None
    }
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceContext;

    /// Makes `span` a child of the remote `parent` in OpenTelemetry and returns the span's
    /// OpenTelemetry ids; `None` when no OpenTelemetry layer records the span.
    pub(super) fn link(span: &Span, parent: Option<&TraceContext>) -> Option<TraceContext> {
        if let Some(p) = parent {
            let state = p
                .state
                .as_deref()
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default();
            let remote = SpanContext::new(
                TraceId::from(p.trace_id),
                SpanId::from(p.span_id),
                TraceFlags::new(p.flags),
                true,
                state,
            );
            span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote))
                .ok()?;
        }
        let cx = span.context();
        let own = cx.span().span_context().clone();
        if !own.is_valid() {
            return None;
        }
        Some(TraceContext {
            trace_id: u128::from_be_bytes(own.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(own.span_id().to_bytes()),
            flags: own.trace_flags().to_u8(),
            state: parent.and_then(|p| p.state.clone()),
        })
    }
}

/// The handling of one delivery: a `busway.handle` span and the trace context the messages
/// published in response carry.
#[derive(Debug)]
pub struct Handling {
    span: Span,
    context: Option<TraceContext>,
}

impl Handling {
    /// The span: enter it (or `instrument` the handler's future with it) while handling.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The context of this handling: a child of the message's, or the message's own when no
    /// subscriber wants spans; `None` when the message carried none and no span was made.
    pub fn context(&self) -> Option<&TraceContext> {
        self.context.as_ref()
    }

    /// Puts this handling's context into a message published in response, unless that
    /// message already carries a `traceparent`.
    pub fn propagate(&self, out: &mut Message) {
        if let Some(ctx) = &self.context {
            if out.headers.get(TRACEPARENT).is_none() {
                ctx.inject(&mut out.headers);
            }
        }
    }
}

/// Starts the handling of `message` by `handler` (a name for the span, e.g. the engine's).
/// A malformed `traceparent` is ignored and counted: the handling starts a new trace.
pub fn handling(message: &Message, handler: &str) -> Handling {
    let parent = TraceContext::from_headers(&message.headers);
    if !spans_enabled() {
        return Handling {
            span: Span::none(),
            context: parent,
        };
    }
    let span = tracing::info_span!(
        target: TARGET,
        "busway.handle",
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_span_id = %parent.as_ref().map(TraceContext::span_id_hex).unwrap_or_default(),
        topic = %message.topic,
        handler = %handler,
    );
    let ctx = identify(&span, parent.as_ref());
    Handling {
        span,
        context: Some(ctx),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec_example_and_prints_it_back() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(tp, Some("congo=t61rcWkgMzE")).expect("valid");
        assert_eq!(ctx.to_string(), tp);
        assert_eq!(ctx.state.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad:?}");
        }
    }
}
