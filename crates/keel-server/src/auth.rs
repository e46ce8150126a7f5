//! API keys and roles: every route but `/healthz` needs a key.
//!
//! Keys come from the environment (named in keel.toml), are compared in constant time
//! against every configured key (so timing says nothing about which or how much
//! matched), and are never logged: the journal and logs name the key, not its value.
//! Each key has its own rate limit; requests that present no valid key are limited
//! per client address (so that guessing keys is slow and costs the server little).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use keel_core::ErrorClass;
use keel_runtime::config::{ApiKey, RateLimitConfig, Role};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's name.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

impl Caller {
    /// Refuses callers whose role is not among `roles` (admin may do everything).
    ///
    /// # Errors
    /// `forbidden`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if self.role == Role::Admin || roles.contains(&self.role) {
            return Ok(());
        }
        Err(ApiError::new(
            ErrorClass::Forbidden,
            format!("key `{}` has role {:?}; this needs {roles:?}", self.name, self.role),
        ))
    }
}

/// Checks keys and rate limits.
pub struct Keys {
    keys: Vec<(String, Role, [u8; 32])>,
    limiter: DefaultKeyedRateLimiter<String>,
    /// Requests without a valid key, per client address.
    strangers: DefaultKeyedRateLimiter<IpAddr>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("count", &self.keys.len()).finish_non_exhaustive()
    }
}

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

impl Keys {
    /// The configured keys and limits.
    pub fn new(keys: &[ApiKey], limit: &RateLimitConfig) -> Self {
        let per_second = NonZeroU32::new(limit.per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limit.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let stranger_rate =
            NonZeroU32::new(limit.unauthenticated_per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let stranger_burst = NonZeroU32::new(limit.unauthenticated_burst.max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            // Comparing fixed-size digests makes the comparison length-independent too.
            keys: keys.iter().map(|k| (k.name.clone(), k.role, digest(k.secret.as_bytes()))).collect(),
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            strangers: RateLimiter::keyed(Quota::per_second(stranger_rate).allow_burst(stranger_burst)),
        }
    }

    /// Counts a request without a valid key against its address: false when the
    /// address is over its limit.
    fn stranger_allowed(&self, req: &Request) -> bool {
        let addr = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |ConnectInfo(a)| a.ip());
        if self.strangers.check_key(&addr).is_err() {
            return false;
        }
        // The map of addresses must not grow without bound under a spray of them.
        if self.strangers.len() > 100_000 {
            self.strangers.retain_recent();
        }
        true
    }

    /// The caller presenting `secret`, if any key matches.
    pub fn identify(&self, secret: &str) -> Option<Caller> {
        let presented = digest(secret.as_bytes());
        let mut found = None;
        // Compare against every key, whatever matched first.
        for (name, role, d) in &self.keys {
            if bool::from(d.ct_eq(&presented)) {
                found = Some(Caller { name: name.clone(), role: *role });
            }
        }
        found
    }
}

/// The key of `Authorization: Bearer KEY` (the scheme in any case, RFC 9110) or of
/// `X-API-Key`.
fn presented_key(req: &Request) -> Option<&str> {
    let h = req.headers();
    if let Some(v) = h.get("authorization").and_then(|v| v.to_str().ok()) {
        let (scheme, key) = v.trim_start().split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| key.trim()).filter(|k| !k.is_empty());
    }
    h.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

fn too_many_strangers() -> ApiError {
    ApiError::new(ErrorClass::RateLimited, "too many requests without a valid API key from this address")
}

/// The middleware: identifies the caller, applies its rate limit, and puts a
/// [`Caller`] in the request's extensions.
pub async fn require_key(State(keys): State<Arc<Keys>>, mut req: Request, next: Next) -> Response {
    let Some(caller) = presented_key(&req).and_then(|k| keys.identify(k)) else {
        if !keys.stranger_allowed(&req) {
            return too_many_strangers().into_response();
        }
        let message = if presented_key(&req).is_some() {
            "the API key is not valid"
        } else {
            "an API key is required (Authorization: Bearer KEY)"
        };
        return ApiError::new(ErrorClass::Unauthorized, message).into_response();
    };
    if keys.limiter.check_key(&caller.name).is_err() {
        let mut resp =
            ApiError::new(ErrorClass::RateLimited, format!("key `{}` is over its rate limit", caller.name))
                .into_response();
        resp.extensions_mut().insert(caller);
        return resp;
    }
    req.extensions_mut().insert(caller.clone());
    let mut resp = next.run(req).await;
    // For the request log: who called (the key's name, never the key).
    resp.extensions_mut().insert(caller);
    resp
}

/// An error of `/v1` in the shape of the API at `path` (Anthropic's for
/// `/v1/messages`, OpenAI's for the rest), with its own `type` values.
pub(crate) fn v1_error(path: &str, class: ErrorClass, message: &str) -> Response {
    keel_gateway::Shape::for_path(path).response(class, message)
}

/// The middleware of `/v1`: like [`require_key`] (a key as `Authorization: Bearer` or
/// `x-api-key`, as Anthropic's clients send it), with errors in each API's shape, and
/// the caller's key name given to the gateway (per-key budgets) as an `ApiKeyId`.
pub async fn require_key_v1(State(keys): State<Arc<Keys>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let Some(caller) = presented_key(&req).and_then(|k| keys.identify(k)) else {
        if !keys.stranger_allowed(&req) {
            let mut r = v1_error(
                &path,
                ErrorClass::RateLimited,
                "too many requests without a valid API key from this address",
            );
            r.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("1"));
            return r;
        }
        let message = if presented_key(&req).is_some() {
            "the API key is not valid"
        } else {
            "an API key is required (Authorization: Bearer KEY, or x-api-key: KEY)"
        };
        return v1_error(&path, ErrorClass::Unauthorized, message);
    };
    if caller.require(&[Role::Agent]).is_err() {
        return v1_error(&path, ErrorClass::Forbidden, "this key may not call models");
    }
    if keys.limiter.check_key(&caller.name).is_err() {
        let mut r = v1_error(&path, ErrorClass::RateLimited, "over the key's rate limit");
        r.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("1"));
        r.extensions_mut().insert(caller);
        return r;
    }
    req.extensions_mut().insert(keel_gateway::ApiKeyId(caller.name.clone()));
    req.extensions_mut().insert(caller.clone());
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(caller);
    resp
}
