//! Configuration errors: each names the file, the line and the key.

use std::fmt;
use std::path::PathBuf;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// The 1-based line, when known.
    pub line: Option<usize>,
    /// The dotted key (`tools.pay.url`), when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a configuration file, reported at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl keel_core::Classified for ConfigErrors {
    fn class(&self) -> keel_core::ErrorClass {
        keel_core::ErrorClass::InvalidRequest
    }
}

/// The 1-based line of byte offset `at` in `text`.
pub(crate) fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Where keys are in a `keel.toml`: its spanned tree, walked by dotted path.
pub(crate) struct Spans<'a> {
    root: Option<toml::Spanned<toml::de::DeTable<'a>>>,
}

impl<'a> Spans<'a> {
    /// The spans of `text` (none when it does not parse: its error says where).
    pub(crate) fn new(text: &'a str) -> Self {
        Self { root: toml::de::DeTable::parse(text).ok() }
    }

    /// The byte offset of the deepest key of `path` present in the file: the key itself
    /// when it is written, else the nearest table that holds it. A segment may index an
    /// array of tables: `keys[0]`.
    pub(crate) fn find(&self, path: &[&str]) -> Option<usize> {
        use toml::de::DeValue;
        let root = self.root.as_ref()?;
        let mut table = root.get_ref();
        let mut at = None;
        for segment in path {
            let (name, index) = match segment.strip_suffix(']').and_then(|s| s.split_once('[')) {
                Some((name, i)) => (name, i.parse::<usize>().ok()),
                None => (*segment, None),
            };
            let Some((key, value)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name) else {
                break;
            };
            at = Some(key.span().start);
            let value = match (value.get_ref(), index) {
                (DeValue::Array(items), Some(i)) => match items.get(i) {
                    Some(item) => {
                        at = Some(item.span().start);
                        item.get_ref()
                    }
                    None => break,
                },
                (v, _) => v,
            };
            match value {
                DeValue::Table(t) => table = t,
                _ => break,
            }
        }
        at
    }

    /// Like [`find`](Self::find), for a dotted key (`tools.pay.policy.retry.max_attempts`).
    pub(crate) fn find_key(&self, key: &str) -> Option<usize> {
        self.find(&key.split('.').collect::<Vec<_>>())
    }
}
