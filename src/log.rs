//! The gateway's own log on stderr: `text` (for people; tracing-subscriber escapes control
//! characters in fields) or `json` (one object per line, for collectors), chosen by
//! `log.format` / `SECRETGATE_LOG_FORMAT`, filtered by `SECRETGATE_LOG`.
//!
//! Logging starts before the configuration is read (so the first lines are not lost), with
//! the format from the environment; [`set_format`] switches it once the file is loaded.
//! Lines about a request carry its request id: every handler runs in a `request` span with
//! the id, and each line within the span names it.

use std::sync::OnceLock;

use tracing_subscriber::{
    EnvFilter, Layer, Registry,
    layer::{Layered, SubscriberExt},
    reload,
    util::SubscriberInitExt,
};

use crate::config::LogFormat;

/// The subscriber below the format layer: the level filter over the registry.
type Filtered = Layered<EnvFilter, Registry>;
type Boxed = Box<dyn Layer<Filtered> + Send + Sync>;

struct Installed {
    handle: reload::Handle<Boxed, Filtered>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// The variable that sets the format before (and over) the configuration file.
const FORMAT_VAR: &str = "SECRETGATE_LOG_FORMAT";

fn layer(format: LogFormat) -> Boxed {
    // Colours only on a terminal: a file or a collector gets no escape sequences at all.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(terminal);
    match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().with_current_span(true).boxed(),
    }
}

/// Starts logging at `default_level` (unless `SECRETGATE_LOG` says otherwise), in the
/// format of `SECRETGATE_LOG_FORMAT` (text without it).
pub fn init(default_level: &'static str) {
    let format = std::env::var(FORMAT_VAR)
        .ok()
        .and_then(|v| LogFormat::try_from(v).ok())
        .unwrap_or_default();
    let filter = std::env::var("SECRETGATE_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default_level));
    let (reloadable, handle) = reload::Layer::new(layer(format));
    if tracing_subscriber::registry().with(filter).with(reloadable).try_init().is_ok() {
        let _ = INSTALLED.set(Installed { handle });
    }
}

/// Switches the log to `format` (the configuration's `log.format`).
pub fn set_format(format: LogFormat) {
    if let Some(i) = INSTALLED.get() {
        let _ = i.handle.reload(layer(format));
    }
}
