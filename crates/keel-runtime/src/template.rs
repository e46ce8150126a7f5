//! `{{path}}` templates: how plans and tools put parameters into argv, URLs and bodies.
//!
//! A placeholder names a dotted path into a JSON context (`{{amount}}`,
//! `{{input.order_id}}`, `{{steps.charge.output.id}}`). In a JSON template, a string
//! that is exactly one placeholder becomes the value itself (a number stays a number);
//! anywhere else the value is written into the text (strings as they are, other values
//! as JSON). A missing value is an error, never an empty string.

use serde_json::Value;

/// A placeholder whose value is missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no value for `{{{{{0}}}}}`")]
pub struct MissingValue(pub String);

/// Looks up a dotted path (`input.items.0`) in `context`.
pub fn lookup<'a>(context: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(context, |v, key| match v {
        Value::Object(map) => map.get(key),
        Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

fn as_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The placeholders of `text`, as (start, end, path) byte ranges.
fn placeholders(text: &str) -> Vec<(usize, usize, &str)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(open) = text[from..].find("{{") {
        let start = from + open;
        let Some(close) = text[start + 2..].find("}}") else { break };
        let end = start + 2 + close + 2;
        found.push((start, end, text[start + 2..end - 2].trim()));
        from = end;
    }
    found
}

/// Renders `text`, writing each value with `encode` (identity for argv, percent-encoding
/// for URLs).
///
/// # Errors
/// [`MissingValue`] for the first placeholder without a value.
pub fn render_text(
    text: &str,
    context: &Value,
    encode: impl Fn(&str) -> String,
) -> Result<String, MissingValue> {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (start, end, path) in placeholders(text) {
        let value = lookup(context, path).ok_or_else(|| MissingValue(path.to_owned()))?;
        out.push_str(&text[last..start]);
        out.push_str(&encode(&as_text(value)));
        last = end;
    }
    out.push_str(&text[last..]);
    Ok(out)
}

/// Renders a JSON template (see the module docs).
///
/// # Errors
/// [`MissingValue`] for the first placeholder without a value.
pub fn render_json(template: &Value, context: &Value) -> Result<Value, MissingValue> {
    Ok(match template {
        Value::String(s) => {
            let found = placeholders(s);
            match found.as_slice() {
                [(0, end, path)] if *end == s.len() => {
                    lookup(context, path).cloned().ok_or_else(|| MissingValue((*path).to_owned()))?
                }
                [] => Value::String(s.clone()),
                _ => Value::String(render_text(s, context, str::to_owned)?),
            }
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| render_json(v, context)).collect::<Result<_, _>>()?)
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_json(v, context)?)))
                .collect::<Result<_, MissingValue>>()?,
        ),
        other => other.clone(),
    })
}

/// Percent-encodes everything but RFC 3986's unreserved characters: a value put into a
/// URL can never change its structure.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn renders_text_json_and_urls() {
        let ctx = json!({"amount": 12.5, "name": "a b/c", "input": {"ids": [7, 8]}});
        assert_eq!(
            render_text("pay {{amount}} to {{ name }}", &ctx, str::to_owned).unwrap(),
            "pay 12.5 to a b/c"
        );
        assert_eq!(
            render_text("/users/{{name}}?id={{input.ids.1}}", &ctx, percent_encode).unwrap(),
            "/users/a%20b%2Fc?id=8"
        );
        let body = render_json(
            &json!({"amount": "{{amount}}", "memo": "for {{name}}", "ids": "{{input.ids}}"}),
            &ctx,
        )
        .unwrap();
        assert_eq!(body, json!({"amount": 12.5, "memo": "for a b/c", "ids": [7, 8]}));
        assert_eq!(render_json(&json!("{{missing}}"), &ctx), Err(MissingValue("missing".into())));
        assert_eq!(
            render_text("{{input.nope}}", &ctx, str::to_owned),
            Err(MissingValue("input.nope".into()))
        );
    }
}
