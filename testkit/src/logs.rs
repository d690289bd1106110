//! Captures every `tracing` event of the test process (all targets, every level), so a test
//! can assert what the logs do or do not say (e.g. that no password is ever logged).
//!
//! ```no_run
//! let logs = busway_testkit::logs::capture();
//! // ... run the code under test ...
//! assert!(!logs.text().contains("hunter2"));
//! ```

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// The captured log text of the process (shared by every caller of [`capture`]).
#[derive(Debug, Clone)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once per process) a global subscriber at TRACE level writing into memory, and
/// returns the capture.
///
/// # Panics
/// When another global subscriber was installed first (the capture would see nothing).
pub fn capture() -> Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing_subscriber::util::SubscriberInitExt::try_init(subscriber)
            .expect("no other global tracing subscriber");
        Logs(buf)
    })
    .clone()
}
