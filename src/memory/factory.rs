//! The `memory` transport factory.

use super::*;

/// The keys a `memory` bus reads besides the common ones (`transport`, `mode`, `url`,
/// `capacity`, `overflow`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MemoryOptions {
    /// Stream mode: entries retained per topic (default 100 000).
    pub(super) retain: Option<usize>,
    /// Largest payload accepted in bytes (default 64 MiB).
    pub(super) max_payload: Option<usize>,
    /// Stream mode: how long `close` waits for subscribers to take what they are owed
    /// (default 5s).
    pub(super) close_timeout: Option<ConfigDuration>,
}

/// Builds [`MemoryBus`]es for `transport = "memory"`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryFactory;

#[async_trait]
impl TransportFactory for MemoryFactory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn validate(&self, ctx: BuildContext<'_>) -> Result<()> {
        config_of(&ctx).map(drop)
    }

    async fn build(&self, ctx: BuildContext<'_>) -> Result<Arc<dyn Bus>> {
        Ok(Arc::new(MemoryBus::with_config(ctx.bus, config_of(&ctx)?)))
    }
}

/// The bus's settings from its config keys.
fn config_of(ctx: &BuildContext<'_>) -> Result<MemoryConfig> {
    let opts: MemoryOptions = ctx.options()?;
    let mut config = MemoryConfig::new(ctx.config.mode).queue(ctx.config.queue_defaults());
    if let Some(retain) = opts.retain {
        if retain == 0 {
            return Err(ctx.config_error("retain", "must be at least 1"));
        }
        config.retain = retain;
    }
    if let Some(max) = opts.max_payload {
        if max == 0 {
            return Err(ctx.config_error("max_payload", "must be at least 1"));
        }
        config.max_payload = max;
    }
    if let Some(t) = opts.close_timeout {
        config.close_timeout = t.0;
    }
    Ok(config)
}
