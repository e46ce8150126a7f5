//! HTTP responses: status, `Retry-After`, and the error bodies that name a class.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode, header::RETRY_AFTER};

use super::Failure;
use crate::class::ErrorClass;

/// The class of an HTTP status, or `None` for a success (1xx–3xx).
pub fn http_status(status: StatusCode) -> Option<ErrorClass> {
    let class = match status.as_u16() {
        100..=399 => return None,
        400 | 413 | 415 | 422 => ErrorClass::InvalidRequest,
        401 | 407 => ErrorClass::Unauthorized,
        403 => ErrorClass::Forbidden,
        404 | 410 => ErrorClass::NotFound,
        408 => ErrorClass::Timeout,
        409 | 412 => ErrorClass::Conflict,
        429 => ErrorClass::RateLimited,
        504 => ErrorClass::Timeout,
        500..=599 => ErrorClass::ServerError,
        _ => ErrorClass::InvalidRequest,
    };
    Some(class)
}

/// Classifies a whole HTTP response: status, `Retry-After`, and a JSON error body.
///
/// Providers send context-length and content-policy errors as a plain 400; the body's
/// `code`/`type`/`message` tell them apart, so they become `context_overflow` and
/// `refusal` rather than `invalid_request`. `now` is the wall time used for an
/// HTTP-date `Retry-After`. Returns `None` for a success.
pub fn http_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Option<Failure> {
    let mut class = http_status(status)?;
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    if class == ErrorClass::InvalidRequest || class == ErrorClass::Forbidden {
        let lower = text.to_ascii_lowercase();
        if lower.contains("context_length_exceeded")
            || lower.contains("maximum context length")
            || lower.contains("prompt is too long")
        {
            class = ErrorClass::ContextOverflow;
        } else if lower.contains("content_policy")
            || lower.contains("content_filter")
            || lower.contains("content management policy")
        {
            class = ErrorClass::Refusal;
        }
    }
    let reason = status.canonical_reason().unwrap_or("");
    let snippet: String = text.chars().take(200).collect();
    let message = if snippet.trim().is_empty() {
        format!("HTTP {} {reason}", status.as_u16())
    } else {
        format!("HTTP {} {reason}: {}", status.as_u16(), snippet.trim())
    };
    Some(Failure::new(class, message).with_retry_after(retry_after(headers, now)))
}

/// Parses `Retry-After` in either form: delta-seconds (`7`) or an HTTP-date
/// (`Wed, 21 Oct 2015 07:28:00 GMT`), relative to `now`. A date in the past means
/// "now" (zero); an unparsable value is ignored.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    // Some servers send fractional seconds; accept them rather than ignore the header.
    if let Ok(seconds) = value.parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 {
            return Some(crate::clock::saturating_secs(seconds.min(1e9)));
        }
        return None;
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}
