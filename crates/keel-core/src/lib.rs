//! keel-core: Keel's policy engine — classify failures, and call targets under
//! retries, a confidence gate, circuit breakers, timeouts and deadlines, budgets, a
//! loop guard, fallback chains and fault injection.
//!
//! It needs no server and no database. Policies are plain serde values
//! ([`PolicyConfig`]); a [`Pipeline`] composes them for one target and wraps any
//! `async` closure, or any `tower::Service` through [`PipelineLayer`]. Every decision
//! is an [`Event`] sent to an [`EventSink`] and to `tracing`. Time comes from a
//! [`Clock`] and randomness from a seedable [`SharedRng`], so decisions replay exactly.
//!
//! ```
//! use keel_core::{ErrorClass, Failure, Pipeline, PolicyConfig, RetryConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let config = PolicyConfig {
//!     retry: RetryConfig { max_attempts: 2, ..RetryConfig::default() },
//!     ..PolicyConfig::default()
//! };
//! let pipeline = Pipeline::builder("search", config).build();
//! let err = pipeline
//!     .call(|_| async { Err::<(), _>(Failure::new(ErrorClass::NotFound, "no such page")) })
//!     .await
//!     .unwrap_err();
//! assert_eq!(err.class, ErrorClass::NotFound); // not retried: retrying cannot help
//! assert_eq!(err.attempts, 1);
//! # }
//! ```

pub mod breaker;
pub mod budget;
pub mod class;
pub mod classify;
pub mod clock;
pub mod correct;
pub mod event;
pub mod fallback;
pub mod fault;
pub mod gate;
pub mod loop_guard;
pub mod pipeline;
pub mod policy;
pub mod retry;
pub mod rng;
pub mod scope;
pub mod signature;
#[cfg(test)]
mod test_support;

pub use breaker::{Breaker, BreakerConfig, BreakerState};
pub use budget::{Budget, BudgetConfig, BudgetExceeded, BudgetKind, Reservation};
pub use class::{Classified, Disposition, ErrorClass};
pub use classify::Failure;
pub use clock::{Clock, TokioClock};
pub use correct::{Corrected, Rounds};
pub use event::{AttemptOutcome, DelayReason, Event, EventSink, Fanout, MemorySink, NullSink, RefusalReason};
pub use fallback::{ChainError, FallbackChain, Served};
pub use fault::{FaultConfig, FaultKind};
pub use gate::{ConfidenceGate, GateConfig};
pub use loop_guard::{LoopDetected, LoopGuard, LoopGuardConfig};
pub use pipeline::{
    Attempt, CallError, ErrorKind, Pipeline, PipelineBuilder, PipelineLayer, Resume, RetryInfo,
};
pub use policy::{FallbackConfig, PolicyConfig, PolicyError, TimeoutConfig};
pub use retry::{Jitter, RetryConfig};
pub use rng::SharedRng;
pub use scope::RunScope;
pub use signature::{CallSignature, canonical_json};
