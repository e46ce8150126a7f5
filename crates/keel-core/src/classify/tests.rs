use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::http::{HeaderMap, HeaderValue, StatusCode};

use super::*;
use crate::class::ErrorClass as C;

fn status(code: u16, expected: Option<C>) {
    assert_eq!(http_status(StatusCode::from_u16(code).unwrap()), expected, "HTTP {code}");
}

#[test]
fn http_statuses() {
    status(200, None);
    status(204, None);
    status(304, None);
    status(400, Some(C::InvalidRequest));
    status(422, Some(C::InvalidRequest));
    status(401, Some(C::Unauthorized));
    status(403, Some(C::Forbidden));
    status(404, Some(C::NotFound));
    status(408, Some(C::Timeout));
    status(409, Some(C::Conflict));
    status(429, Some(C::RateLimited));
    status(500, Some(C::ServerError));
    status(502, Some(C::ServerError));
    status(503, Some(C::ServerError));
    status(504, Some(C::Timeout));
    status(529, Some(C::ServerError));
}

fn headers(retry_after: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(::http::header::RETRY_AFTER, HeaderValue::from_str(retry_after).unwrap());
    h
}

#[test]
fn retry_after_in_both_forms() {
    // 2015-10-21 07:28:00 UTC.
    let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480);
    let check = |value: &str, expected: Option<Duration>| {
        assert_eq!(retry_after(&headers(value), now), expected, "{value:?}");
    };
    check("7", Some(Duration::from_secs(7)));
    check(" 120 ", Some(Duration::from_secs(120)));
    check("1.5", Some(Duration::from_millis(1500)));
    check("Wed, 21 Oct 2015 07:28:30 GMT", Some(Duration::from_secs(30)));
    check("Wed, 21 Oct 2015 07:27:00 GMT", Some(Duration::ZERO)); // in the past: now
    check("soon", None);
    check("-3", None);
    assert_eq!(retry_after(&HeaderMap::new(), now), None);
}

#[test]
fn error_bodies_refine_a_400() {
    let now = SystemTime::UNIX_EPOCH;
    let f = |code: u16, body: &str| {
        http_response(StatusCode::from_u16(code).unwrap(), &HeaderMap::new(), body.as_bytes(), now)
    };
    let overflow = r#"{"error":{"code":"context_length_exceeded","message":"This model's maximum context length is 8192 tokens"}}"#;
    assert_eq!(f(400, overflow).unwrap().class, C::ContextOverflow);
    let policy = r#"{"error":{"code":"content_policy_violation","message":"rejected"}}"#;
    assert_eq!(f(400, policy).unwrap().class, C::Refusal);
    let plain = f(400, r#"{"error":{"message":"missing field model"}}"#).unwrap();
    assert_eq!(plain.class, C::InvalidRequest);
    assert!(plain.message.contains("missing field model"), "{}", plain.message);
    assert!(f(200, "{}").is_none());
    let limited = http_response(StatusCode::TOO_MANY_REQUESTS, &headers("7"), b"", now).unwrap();
    assert_eq!((limited.class, limited.retry_after), (C::RateLimited, Some(Duration::from_secs(7))));
    assert_eq!(limited.message, "HTTP 429 Too Many Requests");
}

#[test]
fn io_and_timeout_errors() {
    let check = |kind: io::ErrorKind, expected: C| {
        assert_eq!(io_error(&io::Error::from(kind)), expected, "{kind:?}");
    };
    check(io::ErrorKind::ConnectionRefused, C::Network);
    check(io::ErrorKind::ConnectionReset, C::Network);
    check(io::ErrorKind::BrokenPipe, C::Network);
    check(io::ErrorKind::UnexpectedEof, C::Network);
    check(io::ErrorKind::TimedOut, C::Timeout);
    check(io::ErrorKind::NotFound, C::NotFound);
    check(io::ErrorKind::PermissionDenied, C::Forbidden);
    check(io::ErrorKind::InvalidInput, C::InvalidRequest);
}

#[tokio::test(start_paused = true)]
async fn a_tokio_timeout_is_a_timeout() {
    let e = tokio::time::timeout(Duration::from_secs(1), std::future::pending::<()>()).await.unwrap_err();
    assert_eq!(elapsed(&e), C::Timeout);
}

#[test]
fn command_exits_and_stderr() {
    let config = CommandConfig {
        stderr: vec![StderrRule { pattern: "(?i)card declined".into(), class: C::Conflict }],
        exit_codes: [(3, C::RateLimited)].into_iter().collect(),
        ..CommandConfig::default()
    };
    let c = CommandClassifier::new(&config).unwrap();
    let check = |exit: CommandExit, stderr: &str, expected: Option<C>| {
        assert_eq!(c.classify(exit, stderr).map(|f| f.class), expected, "{exit:?} {stderr:?}");
    };
    check(CommandExit::Code(0), "warning: whatever", None);
    check(CommandExit::Code(1), "Error: Card Declined by bank", Some(C::Conflict)); // configured first
    check(CommandExit::Code(3), "", Some(C::RateLimited));
    check(CommandExit::Code(1), "grep: /etc/nope: No such file or directory", Some(C::NotFound));
    check(CommandExit::Code(1), "user not found", Some(C::NotFound));
    check(CommandExit::Code(1), "mkdir: cannot create directory: Permission denied", Some(C::Forbidden));
    check(CommandExit::Code(1), "curl: (7) Failed to connect: Connection refused", Some(C::Network));
    check(CommandExit::Code(1), "Traceback (most recent call last):\nKeyError: 'x'", Some(C::CodeError));
    check(CommandExit::Code(2), "usage: tool [-h]", Some(C::InvalidRequest));
    check(CommandExit::Code(127), "", Some(C::NotFound));
    check(CommandExit::Code(124), "", Some(C::Timeout));
    check(CommandExit::Code(1), "something odd", Some(C::ServerError));
    check(CommandExit::Signal(9), "", Some(C::ServerError));
    let f = c.classify(CommandExit::Code(1), "line one\nfatal: boom\n").unwrap();
    assert_eq!(f.message, "exited with status 1: line one\nfatal: boom");
    assert!(
        CommandClassifier::new(&CommandConfig {
            stderr: vec![StderrRule { pattern: "(unclosed".into(), class: C::NotFound }],
            ..CommandConfig::default()
        })
        .is_err()
    );
}

#[test]
fn model_output_checks() {
    let check = |o: ModelOutput<'_>, expected: Option<C>| assert_eq!(model_output(&o), expected, "{o:?}");
    check(ModelOutput { content: Some("hi"), finish_reason: Some("stop"), ..Default::default() }, None);
    check(
        ModelOutput { content: Some(""), finish_reason: Some("stop"), ..Default::default() },
        Some(C::EmptyOutput),
    );
    check(ModelOutput { content: Some("  \n"), ..Default::default() }, Some(C::EmptyOutput));
    check(
        ModelOutput { content: None, tool_calls: 1, finish_reason: Some("tool_calls"), ..Default::default() },
        None,
    );
    check(
        ModelOutput { content: Some("The answer is"), finish_reason: Some("length"), ..Default::default() },
        Some(C::TruncatedOutput),
    );
    check(
        ModelOutput { content: None, finish_reason: Some("content_filter"), ..Default::default() },
        Some(C::Refusal),
    );
    check(
        ModelOutput { content: None, refusal: Some("I can't help with that."), ..Default::default() },
        Some(C::Refusal),
    );
}
