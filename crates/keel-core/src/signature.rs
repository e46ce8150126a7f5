//! Call signatures: the identity of a call, independent of how its parameters were
//! written.
//!
//! Two calls are "the same" when they have the same target and the same parameters
//! after canonicalisation (object keys sorted at every depth). The loop guard compares
//! signatures; canonical JSON is also what idempotency keys and approval digests hash.

use std::hash::{DefaultHasher, Hash, Hasher};

use serde_json::Value;

/// The identity of one call: target plus canonical parameters, hashed.
///
/// The hash is for in-process comparison only; what is stored uses a cryptographic
/// digest of [`canonical_json`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallSignature(pub u64);

impl CallSignature {
    /// The signature of calling `target` with `params`.
    pub fn new(target: &str, params: &Value) -> Self {
        let mut h = DefaultHasher::new();
        target.hash(&mut h);
        hash_value(params, &mut h);
        Self(h.finish())
    }
}

fn hash_value(value: &Value, h: &mut DefaultHasher) {
    match value {
        Value::Null => 0u8.hash(h),
        Value::Bool(b) => (1u8, b).hash(h),
        Value::Number(n) => (2u8, n.to_string()).hash(h),
        Value::String(s) => (3u8, s).hash(h),
        Value::Array(items) => {
            (4u8, items.len()).hash(h);
            items.iter().for_each(|v| hash_value(v, h));
        }
        Value::Object(map) => {
            (5u8, map.len()).hash(h);
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (k, v) in entries {
                k.hash(h);
                hash_value(v, h);
            }
        }
    }
}

/// `value` as JSON text with object keys sorted at every depth and no whitespace:
/// equal for equal parameters however they were written.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            out.push('{');
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_does_not_change_identity() {
        let a = json!({"b": 1, "a": {"y": [1, 2], "x": null}});
        let b: Value = serde_json::from_str(r#"{"a":{"x":null,"y":[1,2]},"b":1}"#).unwrap();
        assert_eq!(CallSignature::new("t", &a), CallSignature::new("t", &b));
        assert_eq!(canonical_json(&a), r#"{"a":{"x":null,"y":[1,2]},"b":1}"#);
        assert_ne!(CallSignature::new("t", &a), CallSignature::new("u", &a));
        assert_ne!(CallSignature::new("t", &a), CallSignature::new("t", &json!({"b": 2})));
    }
}
