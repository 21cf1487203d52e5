//! `[log]`: the gateway's own log on stderr (not the audit log).

use serde::{Deserialize, Serialize};

/// `[log]`
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (for people, the default) or `json` (one object per line, for collectors).
    /// The level is `SECRETGATE_LOG` (`info` by default; `debug` adds one line per request).
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum LogFormat {
    /// Human-readable lines; control characters in fields are escaped.
    #[default]
    Text,
    /// One JSON object per line, with the request's span (and its request id).
    Json,
}

impl TryFrom<String> for LogFormat {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("{other:?} is not a log format; use \"text\" or \"json\"")),
        }
    }
}

impl From<LogFormat> for String {
    fn from(f: LogFormat) -> String {
        match f {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
        .to_owned()
    }
}
