//! A policy's files as text, by name: what `policy check` reads from a directory and what
//! `policy push` sends to the gateway and the store keeps. The same files give the same
//! policy and the same version fingerprint wherever they come from.

use std::{collections::BTreeMap, path::Path};

use sha2::{Digest, Sha256};

use super::{MODEL, Policy, PolicyError, TestFile};
use crate::limits::RATE_LIMITS_FILE;

/// Files a policy may have besides `tests/*.toml`.
const NAMES: [&str; 3] = ["model.conf", "policy.csv", RATE_LIMITS_FILE];
/// Test files at most.
const MAX_TEST_FILES: usize = 1000;

/// A policy's files: `model.conf`, `policy.csv`, optionally `rate_limits.toml`, and
/// `tests/NAME.toml`, each name to its text.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct PolicyFiles(BTreeMap<String, String>);

impl PolicyFiles {
    /// Reads the policy files in `dir` (other files there are not part of the policy).
    pub fn read_dir(dir: &Path) -> Result<Self, PolicyError> {
        let mut files = BTreeMap::new();
        for name in NAMES {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    files.insert(name.to_owned(), text);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && name == RATE_LIMITS_FILE => {}
                Err(source) => {
                    return Err(PolicyError::Read { file: path.display().to_string(), source });
                }
            }
        }
        let tests = dir.join("tests");
        if tests.is_dir() {
            let read = |source| PolicyError::Read { file: tests.display().to_string(), source };
            for entry in std::fs::read_dir(&tests).map_err(read)? {
                let path = entry.map_err(read)?.path();
                if path.extension().is_none_or(|x| x != "toml") {
                    continue;
                }
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
                let text = std::fs::read_to_string(&path).map_err(|source| PolicyError::Read {
                    file: path.display().to_string(),
                    source,
                })?;
                files.insert(format!("tests/{name}"), text);
            }
        }
        Ok(Self(files))
    }

    /// Files received from a client or read from the store: only the names a policy has,
    /// `model.conf` and `policy.csv` present.
    pub fn from_map(files: BTreeMap<String, String>) -> Result<Self, PolicyError> {
        let files = Self(files);
        files.check()?;
        Ok(files)
    }

    /// Checks that only the names a policy has are here, `model.conf` and `policy.csv`
    /// among them (files from a client or from the store).
    pub fn check(&self) -> Result<(), PolicyError> {
        let bad = |name: &str, reason: &str| PolicyError::Syntax {
            file: crate::text::escaped(&name.chars().take(80).collect::<String>()).into_owned(),
            line: 0,
            reason: reason.to_owned(),
        };
        let mut tests = 0;
        for name in self.0.keys() {
            if NAMES.contains(&name.as_str()) {
                continue;
            }
            let test = name.strip_prefix("tests/").and_then(|n| n.strip_suffix(".toml"));
            let safe = |n: &str| {
                !n.is_empty()
                    && n.len() <= 128
                    && !n.starts_with('.')
                    && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            };
            match test {
                Some(n) if safe(n) => tests += 1,
                _ => {
                    return Err(bad(
                        name,
                        "not a policy file (model.conf, policy.csv, rate_limits.toml, tests/NAME.toml)",
                    ));
                }
            }
        }
        if tests > MAX_TEST_FILES {
            return Err(bad("tests/", "more than 1000 test files"));
        }
        for name in ["model.conf", "policy.csv"] {
            if !self.0.contains_key(name) {
                return Err(bad(name, "missing"));
            }
        }
        Ok(())
    }

    /// Each file's name and text, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, t)| (n.as_str(), t.as_str()))
    }

    /// The files, by name.
    pub fn into_map(self) -> BTreeMap<String, String> {
        self.0
    }

    /// Total bytes of text.
    pub fn len(&self) -> usize {
        self.0.iter().map(|(n, t)| n.len() + t.len()).sum()
    }

    /// Whether there are no files.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn text(&self, name: &str, origin: &str) -> Result<&str, PolicyError> {
        self.0.get(name).map(String::as_str).ok_or_else(|| PolicyError::Read {
            file: format!("{origin}/{name}"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
    }
}

impl Policy {
    /// Loads `dir`: parses everything, then runs the table tests; a failing test refuses
    /// the policy.
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        Self::from_files(&PolicyFiles::read_dir(dir)?, &dir.display().to_string())
    }

    /// Loads `dir` without running its tests (for `policy test`, which reports them).
    pub fn load_untested(dir: &Path) -> Result<Self, PolicyError> {
        Self::from_files_untested(&PolicyFiles::read_dir(dir)?, &dir.display().to_string())
    }

    /// Builds the policy of `files` (errors name them as `origin/NAME`) and runs its table
    /// tests; a failing test refuses it.
    pub fn from_files(files: &PolicyFiles, origin: &str) -> Result<Self, PolicyError> {
        let policy = Self::from_files_untested(files, origin)?;
        let failures = policy.run_tests();
        if !failures.is_empty() {
            return Err(PolicyError::TestsFail(failures));
        }
        Ok(policy)
    }

    /// Like [`Policy::from_files`], without running the tests.
    pub fn from_files_untested(files: &PolicyFiles, origin: &str) -> Result<Self, PolicyError> {
        let at = |name: &str| format!("{origin}/{name}");
        let model = files.text("model.conf", origin)?;
        if normalize(model) != normalize(MODEL) {
            return Err(PolicyError::Model { file: at("model.conf") });
        }
        let csv = files.text("policy.csv", origin)?;
        let mut hasher = Sha256::new();
        hasher.update(model);
        hasher.update(csv);
        let mut tests = Vec::new();
        for (name, text) in files.iter() {
            let Some(file_name) = name.strip_prefix("tests/") else { continue };
            hasher.update(file_name);
            hasher.update(text);
            let parsed: TestFile = toml::from_str(text).map_err(|e| PolicyError::Syntax {
                file: at(name),
                line: crate::text::toml_error_line(text, &e),
                reason: e.message().to_owned(),
            })?;
            for (i, mut case) in parsed.case.into_iter().enumerate() {
                case.origin = format!("{} case {}", at(name), i + 1);
                tests.push(case);
            }
        }
        let limits = files.0.get(RATE_LIMITS_FILE);
        if let Some(text) = limits {
            hasher.update(RATE_LIMITS_FILE);
            hasher.update(text);
        }
        let version = hex::encode(&hasher.finalize()[..6]);
        let mut policy = Self::from_csv(csv, &at("policy.csv"), tests, version)?;
        if let Some(text) = limits {
            policy.rate_limits = policy.parse_rate_limits(text, &at(RATE_LIMITS_FILE))?;
        }
        Ok(policy)
    }
}

pub(super) fn normalize(model: &str) -> String {
    model
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect()
}
