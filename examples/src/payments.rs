//! The payments service of the examples: a ledger behind HTTP that honours
//! `Idempotency-Key` and fails on purpose (see `src/bin/payments.rs` for how to run it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

#[derive(Default)]
struct Ledger {
    charges: Vec<Value>,
    by_key: HashMap<String, Value>,
    attempts: u64,
    refunds: Vec<Value>,
}

/// How the service misbehaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// The first this-many new charges answer 503.
    pub fail_first: u64,
    /// Then every this-many-th new charge answers 503 (0: never).
    pub fail_every: u64,
    /// `/notify` answers 502.
    pub notify_down: bool,
    /// A new charge is recorded, then answered this many milliseconds later (a window
    /// in which a client can die with the charge made and the answer unseen).
    pub charge_delay_ms: u64,
}

struct App {
    ledger: Mutex<Ledger>,
    faults: Faults,
}

/// A view of the service's ledger, for tests.
#[derive(Clone)]
pub struct Handle(Arc<App>);

impl Handle {
    /// The charges made, in order.
    pub fn charges(&self) -> Vec<Value> {
        self.0.ledger.lock().unwrap_or_else(|e| e.into_inner()).charges.clone()
    }

    /// The refunds made, in order.
    pub fn refunds(&self) -> Vec<Value> {
        self.0.ledger.lock().unwrap_or_else(|e| e.into_inner()).refunds.clone()
    }

    /// New charge requests received (replays of a known key excluded).
    pub fn attempts(&self) -> u64 {
        self.0.ledger.lock().unwrap_or_else(|e| e.into_inner()).attempts
    }
}

/// The service's routes.
pub fn router(faults: Faults) -> axum::Router {
    router_with_handle(faults).0
}

/// The service's routes and a handle on its ledger.
pub fn router_with_handle(faults: Faults) -> (axum::Router, Handle) {
    let app = Arc::new(App { ledger: Mutex::default(), faults });
    let handle = Handle(app.clone());
    let router = axum::Router::new()
        .route("/charge", post(charge))
        .route("/refund", post(refund))
        .route("/charge-batch", post(charge_batch))
        .route("/notify", post(notify))
        .route("/charges", get(charges))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(app);
    (router, handle)
}

/// Serves the service on `listener` until the process ends.
///
/// # Errors
/// The listener's.
pub async fn serve(listener: tokio::net::TcpListener, faults: Faults) -> std::io::Result<()> {
    axum::serve(listener, router(faults)).await
}

async fn charge(State(app): State<Arc<App>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let charged = {
        let mut l = app.ledger.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stored) = key.as_ref().and_then(|k| l.by_key.get(k)) {
            return ([("idempotent-replayed", "true")], Json(stored.clone())).into_response();
        }
        l.attempts += 1;
        let n = l.attempts;
        if n <= app.faults.fail_first || (app.faults.fail_every > 0 && n % app.faults.fail_every == 0) {
            return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "try again"}))).into_response();
        }
        let Some(amount) = body.get("amount").and_then(Value::as_f64).filter(|a| *a > 0.0) else {
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error": "amount must be positive"})))
                .into_response();
        };
        let charge = json!({
            "charge_id": format!("ch_{}", l.charges.len() + 1),
            "order": body.get("order").cloned().unwrap_or(Value::Null),
            "amount": amount,
        });
        l.charges.push(charge.clone());
        if let Some(k) = key {
            l.by_key.insert(k, charge.clone());
        }
        charge
    };
    if app.faults.charge_delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(app.faults.charge_delay_ms)).await;
    }
    Json(charged).into_response()
}

async fn charge_batch(State(app): State<Arc<App>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut l = app.ledger.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(stored) = key.as_ref().and_then(|k| l.by_key.get(k)) {
        return ([("idempotent-replayed", "true")], Json(stored.clone())).into_response();
    }
    let mut made = Vec::new();
    for item in body.get("items").and_then(Value::as_array).cloned().unwrap_or_default() {
        let charge = json!({
            "charge_id": format!("ch_{}", l.charges.len() + 1),
            "order": item.get("order").cloned().unwrap_or(Value::Null),
            "amount": item.get("amount").cloned().unwrap_or(Value::Null),
        });
        l.charges.push(charge.clone());
        made.push(charge);
    }
    let answer = json!({ "charged": made });
    if let Some(k) = key {
        l.by_key.insert(k, answer.clone());
    }
    Json(answer).into_response()
}

async fn refund(State(app): State<Arc<App>>, Json(body): Json<Value>) -> Response {
    let mut l = app.ledger.lock().unwrap_or_else(|e| e.into_inner());
    l.refunds.push(body.clone());
    Json(json!({"refunded": body})).into_response()
}

async fn notify(State(app): State<Arc<App>>) -> Response {
    if app.faults.notify_down {
        return (StatusCode::BAD_GATEWAY, Json(json!({"error": "mail relay unreachable"}))).into_response();
    }
    Json(json!({"sent": true})).into_response()
}

async fn charges(State(app): State<Arc<App>>) -> Json<Value> {
    let l = app.ledger.lock().unwrap_or_else(|e| e.into_inner());
    Json(
        json!({"count": l.charges.len(), "charges": l.charges, "attempts": l.attempts, "refunds": l.refunds}),
    )
}

/// Starts the service on a free loopback port, on a thread of its own (usable from
/// sync and async tests alike); returns its base URL and a handle on its ledger.
///
/// # Panics
/// When no loopback port can be bound (a test cannot go on without it).
#[allow(clippy::expect_used)]
pub fn spawn(faults: Faults) -> (String, Handle) {
    let (router, handle) = router_with_handle(faults);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let addr = listener.local_addr().expect("its address");
    listener.set_nonblocking(true).expect("non-blocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
            let _ = axum::serve(listener, router).await;
        });
    });
    (format!("http://{addr}"), handle)
}

/// keel.toml tools for this service (`{base}` stands for its URL): `charge` (write-like,
/// approval above 100, a parameter schema) and `notify`. Tests and examples share it.
pub const TOOLS_TOML: &str = r#"
[tools.charge]
kind = "http"
url = "{base}/charge"
write = true
approval = { param = "amount", above = 100 }
params = { type = "object", required = ["order", "amount"], properties = { order = { type = "integer" }, amount = { type = "number" } } }

[tools.notify]
kind = "http"
url = "{base}/notify"
"#;
