//! Output-shape fingerprints: the structure of a result (keys and types, not values),
//! so that a tool answering in a shape it never used before is noticed before its
//! answer is fed into the next step.
//!
//! The shape of `{"items": [{"id": 1, "name": "a"}], "next": null}` is
//! `{items:[{id:number,name:string}],next:null}`: object keys sorted, an array's
//! shape the union of its elements' shapes (so a list's length and order do not
//! matter). The fingerprint is the first 16 hex digits of its sha256.

use std::collections::BTreeSet;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The most nesting described; deeper values are `…`.
const MAX_DEPTH: usize = 16;

/// The structure of `v`, as text.
pub fn shape(v: &Value) -> String {
    describe(v, 0)
}

fn describe(v: &Value, depth: usize) -> String {
    if depth >= MAX_DEPTH {
        return "…".to_owned();
    }
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(_) => "bool".to_owned(),
        Value::Number(_) => "number".to_owned(),
        Value::String(_) => "string".to_owned(),
        Value::Array(items) => {
            let kinds: BTreeSet<String> = items.iter().map(|i| describe(i, depth + 1)).collect();
            format!("[{}]", kinds.into_iter().collect::<Vec<_>>().join("|"))
        }
        Value::Object(map) => {
            let mut keys: Vec<(&String, &Value)> = map.iter().collect();
            keys.sort_by(|a, b| a.0.cmp(b.0));
            let fields: Vec<String> =
                keys.iter().map(|(k, v)| format!("{k}:{}", describe(v, depth + 1))).collect();
            format!("{{{}}}", fields.join(","))
        }
    }
}

/// The fingerprint of `v`'s shape: 16 hex digits.
pub fn fingerprint(v: &Value) -> String {
    let digest = Sha256::digest(shape(v).as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn values_do_not_change_the_shape_structure_does() {
        let a = json!({"items": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "next": null});
        let b = json!({"next": null, "items": [{"name": "z", "id": 9}]});
        assert_eq!(shape(&a), "{items:[{id:number,name:string}],next:null}");
        assert_eq!(fingerprint(&a), fingerprint(&b));
        let flat = json!({"id": 1, "name": "a"});
        assert_ne!(fingerprint(&a), fingerprint(&flat), "a flat object where a list was");
        assert_ne!(fingerprint(&json!([1])), fingerprint(&json!(["1"])));
    }

    #[test]
    fn deep_values_are_bounded() {
        let mut v = json!(1);
        for _ in 0..10_000 {
            v = Value::Array(vec![v]);
        }
        assert!(shape(&v).len() < 100);
        // Dropping a deep value recursively would overflow the stack; leak it instead.
        std::mem::forget(v);
    }
}
