use std::collections::HashSet;

use keel_journal::{RunSnapshot, RunState, RunView, StepView, TicketView};
use serde_json::{Value, json};

use super::*;

fn spec(history_tokens: u64) -> AgentSpec {
    AgentSpec {
        task: "sum the orders".into(),
        model: "m".into(),
        max_turns: 10,
        tools: vec!["lookup".into()],
        system: Some("be brief".into()),
        history_tokens,
        max_repeats: 3,
        correction: correct::CorrectionMode::Adaptive,
        code_attempts: 4,
        stop_on_repeat: true,
        on_schema_drift: shape::DriftPolicy::Flag,
        max_calls_per_turn: 32,
        on_unsolved: correct::Unsolved::Fail,
        result_schema: None,
    }
}

fn step(step: u32, name: &str, target: &str, status: &str, input: Value, output: Option<Value>) -> StepView {
    StepView {
        step,
        name: name.into(),
        target: target.into(),
        status: status.into(),
        input,
        output,
        error_class: (status == "failed").then(|| "server_error".into()),
        message: (status == "failed").then(|| "boom".into()),
        started_at_ms: i64::from(step),
        finished_at_ms: (status != "running").then_some(i64::from(step) + 1),
        shape: None,
    }
}

fn turn_calling(index: u32, n: u32, args: &str) -> StepView {
    let message = json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": format!("c{n}"), "type": "function", "function": {"name": "lookup", "arguments": args}}]});
    let output = json!({"message": message, "charged": {"tokens": 100, "cost_micros": 7, "attempts": 1}});
    step(index, &format!("turn-{n}"), "model:m", "succeeded", json!({}), Some(output))
}

fn snapshot(steps: Vec<StepView>, tickets: Vec<TicketView>) -> RunSnapshot {
    RunSnapshot {
        run: RunView {
            run_id: "run-1".into(),
            name: "agent".into(),
            state: RunState::Running,
            input: json!({}),
            reason: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            last_seq: 0,
        },
        steps,
        attempts: Vec::new(),
        approvals: Vec::new(),
        tickets,
    }
}

#[test]
fn the_history_is_rebuilt_from_the_steps_alone() {
    let snap = snapshot(
        vec![
            turn_calling(0, 1, r#"{"id": 1}"#),
            step(1, "turn-1.call-1", "lookup", "succeeded", json!({"id": 1}), Some(json!({"total": 5}))),
            turn_calling(2, 2, r#"{"id": 2}"#),
            step(3, "turn-2.call-1", "lookup", "failed", json!({"id": 2}), None),
            turn_calling(4, 3, r#"{"id": 3}"#),
        ],
        Vec::new(),
    );
    let h = History::replay(&snap, &HashSet::new(), &spec(100_000));
    assert_eq!(h.turns, 3);
    assert_eq!(h.next_step, 5);
    assert_eq!(h.charged, (300, 21, 3), "what each finished turn charged, summed");
    assert_eq!(h.pending.len(), 1, "the last turn's call is not carried out yet");
    assert_eq!(h.pending[0].step_name, "turn-3.call-1");
    assert_eq!(h.pending[0].arguments, r#"{"id": 3}"#);
    assert!(h.answer.is_none());
    let (messages, dropped) = h.messages(&spec(100_000));
    assert_eq!(dropped, 0);
    let roles: Vec<&str> = messages.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]);
    assert_eq!(messages[3]["tool_call_id"], "c1");
    assert_eq!(messages[3]["content"], r#"{"total":5}"#);
    let failed: Value = serde_json::from_str(messages[5]["content"].as_str().unwrap()).unwrap();
    assert_eq!(failed["error"]["class"], "server_error", "a failure goes back to the model: {failed}");
    assert_eq!(h.signatures.values().sum::<u32>(), 2);
}

#[test]
fn a_crash_during_a_turn_leaves_it_to_be_asked_again_and_nothing_else() {
    let snap = snapshot(
        vec![
            turn_calling(0, 1, "{}"),
            step(1, "turn-1.call-1", "lookup", "succeeded", json!({}), Some(json!(1))),
            step(2, "turn-2", "model:m", "running", json!({}), None),
        ],
        Vec::new(),
    );
    let h = History::replay(&snap, &HashSet::new(), &spec(100_000));
    assert_eq!(h.turns, 1);
    assert_eq!(h.unfinished_turn, Some(2), "the turn is asked again at its own index");
    assert!(h.pending.is_empty());
}

#[test]
fn a_failed_call_with_an_open_ticket_is_not_settled_until_a_person_answers() {
    let failed = step(1, "turn-1.call-1", "lookup", "failed", json!({}), None);
    let ticket = |status: &str, resolved: Option<i64>| TicketView {
        ticket_id: "tkt-1".into(),
        run_id: "run-1".into(),
        step: Some(1),
        class: "server_error".into(),
        summary: String::new(),
        context: json!({}),
        status: status.into(),
        resolution: None,
        resolved_by: None,
        opened_at_ms: 2,
        resolved_at_ms: resolved,
    };
    let open = snapshot(vec![turn_calling(0, 1, "{}"), failed.clone()], vec![ticket("open", None)]);
    assert_eq!(History::replay(&open, &HashSet::new(), &spec(100_000)).pending.len(), 1);
    let resolved =
        snapshot(vec![turn_calling(0, 1, "{}"), failed.clone()], vec![ticket("resolved", Some(9))]);
    assert_eq!(
        History::replay(&resolved, &HashSet::new(), &spec(100_000)).pending.len(),
        1,
        "the resolution is carried out"
    );
    let handled: HashSet<u32> = [1].into();
    assert!(History::replay(&resolved, &handled, &spec(100_000)).pending.is_empty(), "once per drive");
    let none = snapshot(vec![turn_calling(0, 1, "{}"), failed], Vec::new());
    assert!(History::replay(&none, &HashSet::new(), &spec(100_000)).pending.is_empty());
}

#[test]
fn old_exchanges_are_dropped_whole_and_said_in_one_line() {
    let mut steps = Vec::new();
    for n in 1..=30u32 {
        steps.push(turn_calling(2 * (n - 1), n, &format!(r#"{{"id": {n}}}"#)));
        let big = json!({"rows": "x".repeat(600)});
        steps.push(step(
            2 * n - 1,
            &format!("turn-{n}.call-1"),
            "lookup",
            "succeeded",
            json!({"id": n}),
            Some(big),
        ));
    }
    let h = History::replay(&snapshot(steps, Vec::new()), &HashSet::new(), &spec(2_000));
    let spec = spec(2_000);
    let (messages, dropped) = h.messages(&spec);
    assert!(dropped > 20, "{dropped} exchanges dropped");
    let total: usize = messages.iter().map(|m| m.to_string().len() / 3 + 1).sum();
    assert!(total as u64 <= spec.history_tokens, "{total} tokens sent");
    assert_eq!(messages[0]["content"], "be brief");
    assert_eq!(messages[1]["content"], "sum the orders", "the task is always kept");
    let note = messages[2]["content"].as_str().unwrap();
    assert!(note.contains("dropped") && note.contains(&format!("lookup ×{dropped}")), "{note}");
    assert_eq!(messages[3]["role"], "assistant", "an exchange is never split: {}", messages[3]);
    let last = messages.last().unwrap();
    assert_eq!(last["tool_call_id"], "c30", "the latest exchange is kept");
}

#[test]
fn a_huge_tool_answer_is_cut_for_the_model() {
    let view = step(0, "turn-1.call-1", "lookup", "succeeded", json!({}), Some(json!("é".repeat(20_000))));
    let answer = tool_answer(&view);
    assert!(answer.len() < MAX_TOOL_ANSWER_CHARS + 64);
    assert!(answer.ends_with("bytes in all]"));
}
