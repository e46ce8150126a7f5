use std::sync::Arc;

use super::*;
use crate::classify::Failure;
use crate::event::MemorySink;
use crate::policy::PolicyConfig;
use crate::retry::RetryConfig;

fn pipeline(name: &str) -> Pipeline {
    let config = PolicyConfig { retry: RetryConfig::none(), ..PolicyConfig::default() };
    Pipeline::builder(name, config).build()
}

fn chain(sink: Arc<MemorySink>) -> FallbackChain {
    FallbackChain::new(
        vec![pipeline("primary"), pipeline("second"), pipeline("third")],
        FallbackConfig::default(),
    )
    .with_sink(sink)
}

#[tokio::test(start_paused = true)]
async fn an_outage_falls_through_to_the_next_alternative() {
    let sink = MemorySink::new();
    let served = chain(sink.clone())
        .call(|target, _| {
            let target = target.clone();
            async move {
                match &*target {
                    "primary" => Err(Failure::new(ErrorClass::ServerError, "HTTP 503")),
                    "second" => Err(Failure::new(ErrorClass::RateLimited, "HTTP 429")),
                    _ => Ok(42),
                }
            }
        })
        .await
        .unwrap();
    assert_eq!((served.value, &*served.target, served.index), (42, "third", 2));
    assert!(served.fell_back());
    let taken: Vec<_> = sink
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::FallbackTaken { from, to, class } => Some((from.to_string(), to.to_string(), class)),
            _ => None,
        })
        .collect();
    assert_eq!(
        taken,
        [
            ("primary".into(), "second".into(), ErrorClass::ServerError),
            ("second".into(), "third".into(), ErrorClass::RateLimited)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_bad_request_does_not_fall_back() {
    let sink = MemorySink::new();
    let err = chain(sink.clone())
        .call(|_, _| async { Err::<(), _>(Failure::new(ErrorClass::InvalidRequest, "bad params")) })
        .await
        .unwrap_err();
    assert_eq!(err.failures.len(), 1);
    assert_eq!(err.class(), ErrorClass::InvalidRequest);
    assert!(sink.events().iter().all(|e| !matches!(e, Event::FallbackTaken { .. })));
}

#[tokio::test(start_paused = true)]
async fn when_all_fail_the_original_failure_is_kept() {
    let err = chain(MemorySink::new())
        .call(|target, _| {
            let class = if &**target == "primary" { ErrorClass::Timeout } else { ErrorClass::ServerError };
            async move { Err::<(), _>(Failure::new(class, "down")) }
        })
        .await
        .unwrap_err();
    assert_eq!(err.failures.len(), 3);
    assert_eq!(err.primary().unwrap().class, ErrorClass::Timeout);
    assert_eq!(err.class(), ErrorClass::Timeout, "the original failure classifies the call");
    assert_eq!(err.last().unwrap().class, ErrorClass::ServerError);
    let text = err.to_string();
    assert!(text.starts_with("primary: timeout: down"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_class_with_a_route_of_its_own_takes_it_once() {
    let sink = MemorySink::new();
    let outages = FallbackConfig { on: vec![ErrorClass::ServerError, ErrorClass::Timeout] };
    let chain = FallbackChain::new(vec![pipeline("small"), pipeline("backup")], outages)
        .with_route(ErrorClass::ContextOverflow, pipeline("large"))
        .with_sink(sink.clone());
    // A context overflow is not in the chain's classes, but it has a route.
    let served = chain
        .call(|target, _| {
            let target = target.clone();
            async move {
                match &*target {
                    "small" => Err(Failure::new(ErrorClass::ContextOverflow, "too long")),
                    _ => Ok(target.to_string()),
                }
            }
        })
        .await
        .unwrap();
    assert_eq!((served.value.as_str(), served.index), ("large", 1));
    // The route is taken once: a second overflow, there, ends the call (the large
    // model cannot fit it either), classified by the original failure.
    let err = chain
        .call(|_, _| async { Err::<(), _>(Failure::new(ErrorClass::ContextOverflow, "too long")) })
        .await
        .unwrap_err();
    let tried: Vec<&str> = err.failures.iter().map(|(t, _)| &**t).collect();
    assert_eq!(tried, ["small", "large"]);
    assert_eq!(err.class(), ErrorClass::ContextOverflow);
    // A route's target may fail with a chain class: the chain goes on from where it was.
    let served = chain
        .call(|target, _| {
            let target = target.clone();
            async move {
                match &*target {
                    "small" => Err(Failure::new(ErrorClass::ContextOverflow, "too long")),
                    "large" => Err(Failure::new(ErrorClass::ServerError, "503")),
                    _ => Ok(target.to_string()),
                }
            }
        })
        .await
        .unwrap();
    assert_eq!((served.value.as_str(), served.index), ("backup", 2));
}
