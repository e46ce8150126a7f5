//! Digests that bind decisions to exactly what was decided.
//!
//! An approval is bound to the tool and the digest of the arguments the person saw;
//! an idempotency key to the run, the step, the tool and the arguments. Both hash
//! canonical JSON (keys sorted), so the same arguments written differently agree, and
//! any change of an argument changes the digest.

use keel_core::canonical_json;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of `tool` + canonical `params`, hex.
pub fn args_digest(tool: &str, params: &Value) -> String {
    hex(&Sha256::digest(canonical_json(&json!({ "tool": tool, "params": params })).as_bytes()))
}

/// The idempotency key of a step's call: run, step, tool and arguments.
pub fn idempotency_key(run_id: &str, step_id: &str, tool: &str, params: &Value) -> String {
    format!("{run_id}/{step_id}/{}", &args_digest(tool, params)[..32])
}

/// A new random id with a prefix (`run-…`, `apr-…`, `tkt-…`).
pub fn new_id(prefix: &str) -> String {
    let mut rng = fastrand::Rng::new();
    let n: u128 = (u128::from(rng.u64(..)) << 64) | u128::from(rng.u64(..));
    format!("{prefix}-{:020x}", n & ((1u128 << 80) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_follow_the_arguments_not_their_spelling() {
        let a = args_digest("pay", &json!({"amount": 10, "to": "x"}));
        let b = args_digest("pay", &serde_json::from_str(r#"{"to":"x","amount":10}"#).unwrap());
        assert_eq!(a, b);
        assert_ne!(a, args_digest("pay", &json!({"amount": 11, "to": "x"})));
        assert_ne!(a, args_digest("refund", &json!({"amount": 10, "to": "x"})));
        assert_ne!(new_id("run"), new_id("run"));
    }
}
