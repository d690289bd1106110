//! The demo's progress line on a terminal: how far the feed is, and what the router moved.

use std::sync::Arc;
use std::time::Duration;

use busway::{Bus, Router};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;

/// A progress bar on stderr, redrawn from the router's counters while the feed runs;
/// cleared when dropped, so the report that follows stands alone.
pub(super) struct Progress {
    bar: ProgressBar,
    task: JoinHandle<()>,
}

impl Progress {
    /// Starts the bar for a feed of `duration`.
    pub(super) fn start(router: Arc<Router>, duration: Duration) -> Progress {
        let bar = ProgressBar::with_draw_target(
            Some(duration.as_millis() as u64),
            ProgressDrawTarget::stderr_with_hz(4),
        );
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "demo [{{bar:30}}] {{elapsed}} of {}s {{msg}}",
                duration.as_secs_f64()
            ))
            .expect("a valid template")
            .progress_chars("=> "),
        );
        let shown = bar.clone();
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let s = router.stats();
                shown.set_position(started.elapsed().as_millis() as u64);
                shown.set_message(format!(
                    "published {} delivered {} dropped {}",
                    s.published, s.delivered, s.dropped
                ));
            }
        });
        Progress { bar, task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}
