//! The tower adapter: a [`Pipeline`] as a `tower::Layer`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{Layer, Service, ServiceExt};

use super::{CallError, Pipeline};
use crate::class::Classified;

/// Wraps a service so every request goes through a [`Pipeline`].
///
/// Requests are cloned for retries. The loop guard needs a call signature, which a
/// generic request does not have; use [`Pipeline::call_signed`] directly for it.
#[derive(Debug, Clone)]
pub struct PipelineLayer {
    pipeline: Pipeline,
}

impl PipelineLayer {
    /// A layer applying `pipeline`.
    pub fn new(pipeline: Pipeline) -> Self {
        Self { pipeline }
    }
}

impl<S> Layer<S> for PipelineLayer {
    type Service = PipelineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PipelineService { inner, pipeline: self.pipeline.clone() }
    }
}

/// A service whose calls go through a [`Pipeline`].
#[derive(Debug, Clone)]
pub struct PipelineService<S> {
    inner: S,
    pipeline: Pipeline,
}

impl<S, Req> Service<Req> for PipelineService<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Classified + Send,
    S::Response: Send,
    Req: Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = CallError<S::Error>;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each attempt waits for the inner service's readiness itself (`oneshot`), so
        // that a retry after a backoff sees the service as it is then.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let inner = self.inner.clone();
        let pipeline = self.pipeline.clone();
        Box::pin(async move { pipeline.call(move |_| inner.clone().oneshot(req.clone())).await })
    }
}
