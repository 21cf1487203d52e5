//! `SECRETGATE_*` environment overrides of the configuration file.
//!
//! Each variable is matched against the fields of the configuration itself (serialized to a
//! TOML table), so the list of variables can never drift from the fields.

use std::collections::BTreeMap;

use super::{Config, ConfigError};

/// Environment variables with the `SECRETGATE_` prefix that belong to the CLI, not to the
/// server configuration.
const CLIENT_VARS: &[&str] =
    &["ADDR", "CA", "CERT", "KEY", "CONFIG", "LOG", "OUTPUT", "KEYRING", "POLICIES"];

impl Config {
    /// Applies `SECRETGATE_*` overrides. Each variable is matched against the fields of the
    /// configuration itself, so the list of variables can never drift from the fields.
    pub(super) fn with_env(
        self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = toml::Table::try_from(&self)
            .map_err(|e| ConfigError::Env { var: "SECRETGATE_*".into(), reason: e.to_string() })?;
        let fields = field_index(&table);
        let mut applied = Vec::new();
        for (var, value) in env {
            let Some(name) = var.strip_prefix("SECRETGATE_") else { continue };
            if CLIENT_VARS.contains(&name) {
                continue;
            }
            let Some(field) = fields.get(name) else {
                tracing::warn!(variable = %var, "ignoring unknown SECRETGATE_ variable");
                continue;
            };
            let slot = field_slot(&mut table, field);
            let typed = typed_like(slot, &value);
            *slot = typed.map_err(|reason| ConfigError::Env { var: var.clone(), reason })?;
            applied.push((var, field.clone(), slot.clone()));
        }
        if applied.is_empty() {
            return Ok(self);
        }
        table.try_into().map_err(|e: toml::de::Error| {
            // A value of the right type that the field refuses (an address, a range): name
            // the variable that is refused on its own.
            let original = toml::Table::try_from(&self).ok();
            let culprit = original.and_then(|original| {
                applied.iter().find_map(|(var, field, value)| {
                    let mut alone = original.clone();
                    *field_slot(&mut alone, field) = value.clone();
                    let refused = alone.try_into::<Self>().err()?;
                    Some((var.clone(), refused.message().to_owned()))
                })
            });
            let (var, reason) = culprit.unwrap_or_else(|| {
                let vars: Vec<&str> = applied.iter().map(|(v, ..)| v.as_str()).collect();
                (vars.join(", "), e.message().to_owned())
            });
            ConfigError::Env { var, reason }
        })
    }
}

/// Maps `FIELD` / `SECTION_FIELD` (upper case) to the dotted key path of every scalar field.
pub(super) fn field_index(table: &toml::Table) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for (k, v) in table {
        match v {
            toml::Value::Table(section) => {
                for (f, _) in section {
                    out.insert(format!("{k}_{f}").to_uppercase(), vec![k.clone(), f.clone()]);
                }
            }
            _ => {
                out.insert(k.to_uppercase(), vec![k.clone()]);
            }
        }
    }
    out
}

fn field_slot<'t>(table: &'t mut toml::Table, path: &[String]) -> &'t mut toml::Value {
    let (last, sections) = path.split_last().expect("field paths are never empty");
    let mut t = table;
    for s in sections {
        t = t
            .get_mut(s)
            .and_then(toml::Value::as_table_mut)
            .expect("field_index only returns paths into existing sections");
    }
    t.get_mut(last).expect("field_index only returns existing fields")
}

fn typed_like(current: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    match current {
        toml::Value::Integer(_) => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("expected an integer, got {raw:?}")),
        toml::Value::Boolean(_) => raw
            .trim()
            .parse::<bool>()
            .map(toml::Value::Boolean)
            .map_err(|_| format!("expected true or false, got {raw:?}")),
        toml::Value::Array(_) => Ok(toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        )),
        _ => Ok(toml::Value::String(raw.to_owned())),
    }
}
