//! The conformance suite, written once against `Arc<dyn Bus>`.
