//! `/api/openapi.json`, generated from the code: the route table below and the
//! request/response types' `schemars` schemas.
//!
//! Written here rather than with a crate: aide's support for axum 0.8 and schemars 1 is
//! still alpha, and utoipa would need a second schema derive on every type. A test
//! calls every route of this table on the real router, so the two cannot drift apart.

use schemars::{JsonSchema, Schema, schema_for};
use serde_json::{Map, Value, json};

use crate::api::{approvals, runs, tickets, tools};
use crate::dashboard::Dashboard;
use crate::error::ApiError;

/// One documented route.
#[derive(Debug, Clone, Copy)]
pub struct RouteDoc {
    /// `get` or `post`.
    pub method: &'static str,
    /// The path, with `{param}` segments.
    pub path: &'static str,
    /// What it does.
    pub summary: &'static str,
    /// The roles allowed (empty: any key).
    pub roles: &'static str,
    /// The request body's schema.
    pub request: Option<fn() -> Schema>,
    /// The success response's status and schema.
    pub response: (u16, Option<fn() -> Schema>),
}

fn s<T: JsonSchema>() -> Schema {
    schema_for!(T)
}

/// Every `/api` route (plus the operational ones).
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/healthz",
        summary: "Liveness; needs no key",
        roles: "none",
        request: None,
        response: (200, None),
    },
    RouteDoc {
        method: "get",
        path: "/readyz",
        summary: "Readiness: the journal answers",
        roles: "",
        request: None,
        response: (200, None),
    },
    RouteDoc {
        method: "get",
        path: "/metrics",
        summary: "Prometheus metrics",
        roles: "",
        request: None,
        response: (200, None),
    },
    RouteDoc {
        method: "get",
        path: "/api/openapi.json",
        summary: "This document",
        roles: "",
        request: None,
        response: (200, None),
    },
    RouteDoc {
        method: "post",
        path: "/api/runs",
        summary: "Start a plan run (the server's workers carry it out), or with no plan an agent's own run to name in X-Keel-Run",
        roles: "agent",
        request: Some(s::<runs::StartRun>),
        response: (201, Some(s::<runs::Started>)),
    },
    RouteDoc {
        method: "get",
        path: "/api/runs",
        summary: "List runs, newest first",
        roles: "",
        request: None,
        response: (200, None),
    },
    RouteDoc {
        method: "get",
        path: "/api/runs/{id}",
        summary: "A run with its steps, attempts, approvals, tickets and timeline",
        roles: "",
        request: None,
        response: (200, None),
    },
    RouteDoc {
        method: "post",
        path: "/api/runs/{id}/cancel",
        summary: "Cancel a run",
        roles: "agent, approver",
        request: None,
        response: (200, None),
    },
    RouteDoc {
        method: "post",
        path: "/api/runs/{id}/resume",
        summary: "Carry a run on now",
        roles: "agent, approver",
        request: None,
        response: (202, None),
    },
    RouteDoc {
        method: "get",
        path: "/api/approvals",
        summary: "List approvals, pending first, with context",
        roles: "",
        request: None,
        response: (200, None),
    },
    RouteDoc {
        method: "get",
        path: "/api/approvals/{id}",
        summary: "An approval with its run and the exact arguments",
        roles: "",
        request: None,
        response: (200, None),
    },
    RouteDoc {
        method: "post",
        path: "/api/approvals/{id}/approve",
        summary: "Approve (bound to the arguments' digest; consumed once)",
        roles: "approver",
        request: Some(s::<approvals::Decision>),
        response: (200, None),
    },
    RouteDoc {
        method: "post",
        path: "/api/approvals/{id}/reject",
        summary: "Reject",
        roles: "approver",
        request: Some(s::<approvals::Decision>),
        response: (200, None),
    },
    RouteDoc {
        method: "get",
        path: "/api/tickets",
        summary: "List tickets, open first",
        roles: "",
        request: None,
        response: (200, None),
    },
    RouteDoc {
        method: "get",
        path: "/api/tickets/{id}",
        summary: "A ticket with its context package",
        roles: "",
        request: None,
        response: (200, None),
    },
    RouteDoc {
        method: "post",
        path: "/api/tickets/{id}/resolve",
        summary: "Answer a ticket: retry (with new params), skip, abort",
        roles: "approver",
        request: Some(s::<tickets::Resolve>),
        response: (200, None),
    },
    RouteDoc {
        method: "get",
        path: "/api/faults",
        summary: "Fault injection set on this running server, by tool (drills)",
        roles: "admin",
        request: None,
        response: (200, None),
    },
    RouteDoc {
        method: "put",
        path: "/api/faults/{tool}",
        summary: "Inject faults into a tool's calls from now on: {rate, kinds, latency, seed}; marked injected in events (no alert)",
        roles: "admin",
        request: Some(s::<keel_core::FaultConfig>),
        response: (200, None),
    },
    RouteDoc {
        method: "delete",
        path: "/api/faults/{tool}",
        summary: "Clear a tool's injected faults (back to its configured policy)",
        roles: "admin",
        request: None,
        response: (200, None),
    },
    RouteDoc {
        method: "get",
        path: "/api/incidents",
        summary: "Alert incidents, open first, each with its timeline (triggered, held, resolved, deliveries per sink); ?limit=50",
        roles: "",
        request: None,
        response: (200, None),
    },
    RouteDoc {
        method: "post",
        path: "/api/tools/{name}/invoke",
        summary: "Invoke a tool under its policy, idempotency (Idempotency-Key: a retry answers from the key's run; other arguments: 422 conflict) and approval rule; 202 with the run's state when not done; ?wait=30s bounds the request",
        roles: "agent",
        request: Some(s::<tools::Invoke>),
        response: (200, Some(s::<tools::Invoked>)),
    },
    RouteDoc {
        method: "get",
        path: "/api/dashboard",
        summary: "Error rate by target, retries per run, error classes over time, breaker states",
        roles: "",
        request: None,
        response: (200, Some(s::<Dashboard>)),
    },
    RouteDoc {
        method: "get",
        path: "/api/budgets",
        summary: "The gateway's budgets: used, limit, reserved in flight, refusals, held after an overshoot",
        roles: "",
        request: None,
        response: (200, Some(s::<crate::ops::BudgetsView>)),
    },
];

/// The OpenAPI 3.1 document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for r in ROUTES {
        let mut op = json!({
            "summary": r.summary,
            "description": format!("Roles: {}.", if r.roles.is_empty() { "any key" } else { r.roles }),
            "responses": {
                r.response.0.to_string(): {
                    "description": "success",
                    "content": {"application/json": {"schema": r.response.1.map_or(json!({}), |f| f().to_value())}}
                },
                "default": {
                    "description": "an error: {class, message, retryable, attempts}",
                    "content": {"application/json": {"schema": s::<ApiError>().to_value()}}
                }
            }
        });
        if r.roles != "none" {
            op["security"] = json!([{"bearer": []}]);
        }
        if let Some(req) = r.request {
            op["requestBody"] = json!({"content": {"application/json": {"schema": req().to_value()}}});
        }
        if r.path.contains('{') {
            let params: Vec<Value> = r
                .path
                .split('/')
                .filter_map(|seg| seg.strip_prefix('{').and_then(|p| p.strip_suffix('}')))
                .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
                .collect();
            op["parameters"] = Value::Array(params);
        }
        if r.path.ends_with("/invoke") {
            let params = op["parameters"].as_array_mut().map(std::mem::take).unwrap_or_default();
            let mut params = params;
            params.push(json!({"name": "wait", "in": "query", "schema": {"type": "string"}, "description": "e.g. 30s"}));
            params.push(json!({"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}));
            op["parameters"] = Value::Array(params);
        }
        let entry = paths.entry(r.path.to_owned()).or_insert_with(|| json!({}));
        entry[r.method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Keel API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Runs, approvals, tickets and tool invocation. Errors are {class, message, retryable, attempts}."},
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
    })
}
