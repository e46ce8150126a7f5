//! keel-gateway: Keel's model gateway — an OpenAI-compatible endpoint that makes every
//! model call failure-first: retried when a retry can help, failed over to fallback
//! models, guarded by a breaker per model, budgeted per API key and per run, validated,
//! journaled and counted, with streams that are rescued instead of silently cut.
//!
//! - [`ModelConfig`]: a `[models.NAME]` table of `keel.toml` (provider, upstream,
//!   policy, fallbacks, prices, options).
//! - [`Gateway`]: the models and their state; [`Gateway::complete`] and
//!   [`Gateway::stream`] call a model by name without HTTP (the agent loop's client).
//! - [`router`]: `POST /v1/chat/completions`, `/v1/responses`, `/v1/messages`,
//!   `/v1/embeddings`, `GET /v1/models[/{id}]` for `keel serve`; the server's auth
//!   layer inserts an [`ApiKeyId`] extension.
//! - [`wire`]: OpenAI's wire format, parsed shallowly; Anthropic's upstream dialect,
//!   translated; the Responses and Messages APIs, translated at the edge.
//! - [`error`]: each API's error shape ([`error::Shape`]).
//! - [`stream`]: what happens when a stream fails (read its docs).
//!
//! ```
//! use std::collections::BTreeMap;
//! use keel_gateway::{Gateway, ModelConfig, Provider};
//!
//! let mut models = BTreeMap::new();
//! models.insert("gpt".to_owned(), ModelConfig::new(Provider::Openai, "http://127.0.0.1:18080/v1", "gpt-4o-mini"));
//! let gateway = Gateway::builder(models).env(|_| None).build().expect("valid models");
//! assert_eq!(gateway.model_names().collect::<Vec<_>>(), ["gpt"]);
//! let app: axum::Router = keel_gateway::router(std::sync::Arc::new(gateway));
//! # drop(app);
//! ```

pub mod charges;
pub mod config;
mod dialect;
pub mod embeddings;
pub mod error;
mod gateway;
pub mod journal;
pub mod metrics;
mod router;
pub mod stream;
mod trace;
mod upstream;
pub mod validate;
pub mod wire;

pub use config::{ConfigError, GatewayConfig, ModelConfig, ModelPolicy, Prices, Provider};
pub use error::{GatewayError, Shape};
pub use gateway::{CallContext, Completion, Gateway, GatewayBuilder};
pub use journal::{CallJournal, CallRecord, MemoryJournal, WriterJournal};
pub use metrics::{BudgetMetrics, MetricsSnapshot, ModelMetrics};
pub use router::{ApiKeyId, RUN_HEADER, router};
pub use stream::StreamResponse;
pub use wire::{ChatRequest, Usage};
