// Keel's web inbox: approvals, tickets, incidents, runs and a dashboard over /api.
// The API key is kept in this tab's sessionStorage only (gone when the tab closes,
// never written to disk by localStorage, never in a URL) and sent as a bearer token.
"use strict";

// Earlier versions kept the key in localStorage: forget it there.
try { localStorage.removeItem("keel-key"); } catch (_) { /* storage disabled */ }
const state = { tab: "approvals", key: sessionStorage.getItem("keel-key") || "", openRun: null };
const $ = (sel) => document.querySelector(sel);

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${state.key}` };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { ...options, headers, body: options.body === undefined ? undefined : JSON.stringify(options.body) });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(`${data.class || resp.status}: ${data.message || resp.statusText}`);
  return data;
}

function status(text, isError) {
  const el = $("#status");
  el.textContent = text || "";
  el.className = isError ? "error" : "muted";
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  return `${Math.floor(s / 3600)}h ago`;
}

async function renderApprovals() {
  const items = await api("/api/approvals");
  const pending = items.filter((i) => i.approval.status === "pending");
  $("#count-approvals").textContent = pending.length || "";
  const el = $("#approvals");
  if (!items.length) { el.innerHTML = `<p class="muted">No approvals.</p>`; return; }
  el.innerHTML = items.map((i) => {
    const a = i.approval;
    // Exactly the arguments the approval's digest covers (not the step's latest).
    const args = i.args === null || i.args === undefined ? "(arguments not recorded)" : JSON.stringify(i.args, null, 2);
    const left = Math.round((a.expires_at_ms - Date.now()) / 1000);
    const buttons = a.status === "pending"
      ? `<div class="actions">
           <input class="comment" data-id="${esc(a.approval_id)}" placeholder="comment (optional)">
           <button class="approve" data-approve="${esc(a.approval_id)}">Approve</button>
           <button class="reject" data-reject="${esc(a.approval_id)}">Reject</button>
           <span class="muted">expires in ${left}s</span></div>`
      : `<p class="muted">${esc(a.status)}${a.decided_by ? " by " + esc(a.decided_by) : ""}</p>`;
    return `<div class="card approval" data-approval="${esc(a.approval_id)}" data-status="${esc(a.status)}">
      <h3>${esc(a.tool)} <span class="muted">— run ${esc(i.run.name)} (${esc(a.run_id)})</span></h3>
      <div class="muted">step ${esc(i.step ? i.step.name : a.step)} · requested ${ago(a.requested_at_ms)} · digest ${esc(a.args_digest.slice(0, 16))}…</div>
      <pre>${esc(args)}</pre>${buttons}</div>`;
  }).join("");
}

// A ticket's context package as sections a person reads in a minute: what failed and
// where, the error, what the run had done, what Keel suggests; the raw JSON folded away.
function contextSections(c) {
  const short = (v) => { const s = JSON.stringify(v); return s === undefined ? "" : s.length > 160 ? s.slice(0, 160) + "…" : s; };
  const parts = [];
  const f = c.failing_step;
  if (f) {
    parts.push(`<section class="ctx-failed"><h4>What failed</h4><p>step <b>${esc(f.id)}</b> calling <b>${esc(f.tool)}</b> with <code>${esc(short(f.params))}</code></p></section>`);
  }
  const e = c.error;
  if (e) {
    parts.push(`<section class="ctx-error"><h4>The error</h4><p><b>${esc(e.class)}</b>${e.attempts ? ` after ${esc(e.attempts)} attempt(s)` : ""}</p><pre>${esc(e.message || "")}</pre></section>`);
  }
  const done = Object.entries(c.steps_done || {});
  if (done.length) {
    parts.push(`<section class="ctx-done"><h4>Steps done (${done.length})</h4><ul>${done.slice(-10).map(([id, out]) => `<li><b>${esc(id)}</b>: <code>${esc(short(out))}</code></li>`).join("")}</ul></section>`);
  }
  if (c.suggestion) {
    parts.push(`<section class="ctx-suggestion"><h4>Suggestion</h4><p>${esc(c.suggestion)}</p></section>`);
  }
  parts.push(`<details><summary>the whole context</summary><pre>${esc(JSON.stringify(c, null, 2))}</pre></details>`);
  return parts.join("");
}

async function renderTickets() {
  const items = await api("/api/tickets");
  const open = items.filter((i) => i.ticket.status === "open");
  $("#count-tickets").textContent = open.length || "";
  const el = $("#tickets");
  if (!items.length) { el.innerHTML = `<p class="muted">No tickets.</p>`; return; }
  el.innerHTML = items.map((i) => {
    const t = i.ticket;
    const actions = t.status === "open"
      ? `<div class="actions">
          <button data-resolve="${esc(t.ticket_id)}" data-action="retry">Retry</button>
          <button data-resolve="${esc(t.ticket_id)}" data-action="skip">Skip</button>
          <button data-resolve="${esc(t.ticket_id)}" data-action="abort">Abort</button>
          <input class="params" data-id="${esc(t.ticket_id)}" placeholder='new params for retry, e.g. {"amount": 5}' size="40">
        </div>`
      : `<p class="muted">resolved by ${esc(t.resolved_by)}: ${esc(JSON.stringify(t.resolution))}</p>`;
    return `<div class="card ticket" data-ticket="${esc(t.ticket_id)}" data-status="${esc(t.status)}">
      <h3>${esc(t.class)} <span class="muted">— ${esc(i.run.name)} (${esc(t.run_id)})</span></h3>
      <div>${esc(t.summary)}</div>
      ${contextSections(t.context || {})}${actions}</div>`;
  }).join("");
}

// A time as UTC, to the second: incidents are compared with PagerDuty's and Slack's.
function when(ms) {
  return ms === null || ms === undefined ? "" : new Date(ms).toISOString().replace("T", " ").slice(0, 19) + "Z";
}

// One line of an incident's timeline, in words.
function incidentLine(e) {
  const to = e.sink ? ` → ${esc(e.sink)}` : "";
  const what = {
    triggered: "incident opened",
    held: "trigger held for quiet hours",
    released: "quiet hours over: trigger sent",
    resolved: "resolved",
    cancelled: "resolved during quiet hours: nothing sent",
    delivered: `${esc(e.action)} delivered${to}`,
    failed: `${esc(e.action)} not delivered${to}`,
    dropped: `${esc(e.action)} dropped (queue full)${to}`,
    adopted: "taken over by a restarted server",
  }[e.kind] || esc(e.kind);
  return `<li class="ev-${esc(e.kind)}"><time>${when(e.at_ms)}</time> ${what}${e.detail ? ` <span class="muted">(${esc(e.detail)})</span>` : ""}</li>`;
}

// Incidents, open first, each with its timeline: when it opened and how many failures
// did it, every delivery and its outcome, when it resolved.
async function renderIncidents() {
  const items = await api("/api/incidents");
  const open = items.filter((i) => i.state === "open");
  $("#count-incidents").textContent = open.length || "";
  const el = $("#incidents");
  if (!items.length) { el.innerHTML = `<p class="muted">No incidents.</p>`; return; }
  el.innerHTML = items.map((i) => {
    const what = i.class && i.target ? `${esc(i.count)} × <b>${esc(i.class)}</b> on <b>${esc(i.target)}</b>` : `key ${esc(i.key)}`;
    const closed = i.state === "open"
      ? `<span class="incident-open">open</span> for ${ago(i.triggered_at_ms).replace(" ago", "")}`
      : `resolved ${when(i.resolved_at_ms)}`;
    return `<div class="card incident" data-incident="${esc(i.id)}" data-state="${esc(i.state)}">
      <h3><span class="sev sev-${esc(i.severity)}">${esc(i.severity)}</span> ${esc(i.rule)} <span class="muted">— ${esc(i.key)}</span></h3>
      <div>${what} · triggered ${when(i.triggered_at_ms)} · ${closed}</div>
      <ol class="timeline">${(i.timeline || []).map(incidentLine).join("")}</ol></div>`;
  }).join("");
}

async function renderRuns() {
  const runs = await api("/api/runs");
  let html = `<table><tr><th>run</th><th>name</th><th>state</th><th>updated</th></tr>` + runs.map((r) =>
    `<tr class="clickable" data-run="${esc(r.run_id)}"><td>${esc(r.run_id)}</td><td>${esc(r.name)}</td>
     <td class="state-${esc(r.state)}">${esc(r.state)}</td><td>${ago(r.updated_at_ms)}</td></tr>`).join("") + `</table>`;
  if (state.openRun) {
    const x = await api(`/api/runs/${encodeURIComponent(state.openRun)}`);
    const start = x.events.length ? x.events[0].recorded_at_ms : 0;
    const line = (e) => {
      const ev = e.event;
      let what = ev.type;
      if (ev.type === "policy") {
        const p = ev.event;
        if (p.type === "budget_charged" || p.type === "attempt_started") return "";
        if (p.type === "attempt_ended") what = `${p.target} attempt ${p.attempt}: ${typeof p.outcome === "string" ? p.outcome : p.outcome.failed} (${p.latency})`;
        else if (p.type === "retry_scheduled") what = `retry in ${p.delay} (${p.reason}) after ${p.class}`;
        else if (p.type === "retry_refused") what = `no retry: ${p.reason.kind}`;
        else if (p.type === "fallback_taken") what = `fallback ${p.from} → ${p.to} (${p.class})`;
        else if (p.type === "breaker_transition") what = `breaker ${p.target}: ${p.from} → ${p.to}`;
        else what = p.type;
      } else if (ev.type === "step_started") what = `step ${ev.name} → ${ev.target}`;
      else if (ev.type === "step_finished") what = `step ${ev.step} ${ev.outcome.status}${ev.outcome.class ? ": " + ev.outcome.class : ""}`;
      else if (ev.type === "run_state_changed") what = `run ${ev.state}${ev.reason ? " (" + ev.reason + ")" : ""}`;
      return `<li>+${((e.recorded_at_ms - start) / 1000).toFixed(3)}s ${esc(what)}</li>`;
    };
    html += `<div class="card"><h3>${esc(x.state.run.name)} <span class="state-${esc(x.state.run.state)}">${esc(x.state.run.state)}</span></h3>
      <ol class="timeline">${x.events.map(line).join("")}</ol></div>`;
  }
  $("#runs").innerHTML = html;
}

function bars(entries, opts = {}) {
  if (!entries.length) return `<p class="muted">No data yet.</p>`;
  const max = Math.max(...entries.map((e) => e[1]), opts.max || 0) || 1;
  const h = 22 * entries.length + 4;
  return `<svg width="100%" height="${h}" viewBox="0 0 600 ${h}">` + entries.map(([label, v], i) => {
    const w = Math.round((v / max) * 380);
    const text = opts.percent ? `${(v * 100).toFixed(1)}%` : v;
    return `<text x="0" y="${i * 22 + 16}" font-size="12">${esc(label).slice(0, 28)}</text>
      <rect class="bar ${opts.err ? "err" : ""}" x="190" y="${i * 22 + 4}" width="${w}" height="16"></rect>
      <text x="${196 + w}" y="${i * 22 + 16}" font-size="12">${text}</text>`;
  }).join("") + `</svg>`;
}

// One budget's kind as "used / limit" (cost in dollars; no limit is "no limit").
function budgetCell(b, kind) {
  const fmt = (v) => (kind === "cost_micros" ? `$${(v / 1e6).toFixed(4)}` : String(v));
  const used = b.used[kind] || 0;
  const limit = b.limit[kind];
  const reserved = b.reserved[kind] || 0;
  const text = limit === undefined ? `${fmt(used)} (no limit)` : `${fmt(used)} / ${fmt(limit)}`;
  return `<td data-kind="${kind}">${text}${reserved ? ` <span class="reserved">(${fmt(reserved)} in flight)</span>` : ""}</td>`;
}

function renderBudgets(view) {
  const rows = Object.entries(view.budgets || {}).map(([name, b]) =>
    `<tr data-budget="${esc(name)}"><td>${esc(name)}</td>${budgetCell(b, "tokens")}${budgetCell(b, "cost_micros")}${budgetCell(b, "attempts")}
      <td>${b.refusals}</td><td class="${b.held ? "held" : ""}">${b.held ? "held until calls in flight settle" : "open"}</td></tr>`).join("");
  return `<div class="chart" id="budgets"><h3>Budgets</h3>${rows
    ? `<table><tr><th>budget</th><th>tokens</th><th>cost</th><th>attempts</th><th>refused</th><th>state</th></tr>${rows}</table>`
    : "<p>No budget has been charged yet.</p>"}</div>`;
}

async function renderDashboard() {
  const [d, budgets] = await Promise.all([api("/api/dashboard"), api("/api/budgets")]);
  const targets = Object.entries(d.targets);
  const classes = Object.entries(d.classes_over_time).map(([c, hours]) =>
    `<tr><td>${esc(c)}</td><td>${Object.entries(hours).map(([h, n]) => `${new Date(Number(h)).toISOString().slice(5, 13)}h: ${n}`).join(", ")}</td></tr>`).join("");
  $("#dashboard").innerHTML = `
    <div class="chart"><h3>Error rate by target</h3>${bars(targets.map(([t, s]) => [t, s.error_rate]), { percent: true, err: true, max: 1 })}</div>
    <div class="chart"><h3>Retries per run</h3>${bars(d.retries_per_run.map(([r, n]) => [r, n]))}</div>
    <div class="chart"><h3>Top error classes</h3>${bars(d.top_classes, { err: true })}
      <table><tr><th>class</th><th>failed attempts per hour</th></tr>${classes}</table></div>
    <div class="chart"><h3>Breakers</h3><table>${targets.map(([t, s]) =>
      `<tr><td>${esc(t)}</td><td class="breaker-${esc(s.breaker || "closed")}">${esc(s.breaker || "closed")}</td><td>${s.calls} calls, ${s.errors} errors</td></tr>`).join("")}</table></div>
    ${renderBudgets(budgets)}`;
}

async function refresh() {
  if (!state.key) { status("Enter an API key to see the inbox."); return; }
  try {
    await Promise.all([renderApprovals(), renderTickets(), renderIncidents()]);
    if (state.tab === "runs") await renderRuns();
    if (state.tab === "dashboard") await renderDashboard();
    status(`updated ${new Date().toLocaleTimeString()}`);
  } catch (e) {
    status(e.message, true);
  }
}

document.addEventListener("click", async (ev) => {
  const t = ev.target.closest("button, tr[data-run]");
  if (!t) return;
  try {
    if (t.dataset.tab) {
      state.tab = t.dataset.tab;
      document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("active", b === t));
      document.querySelectorAll(".tab").forEach((s) => { s.hidden = s.id !== state.tab; });
    } else if (t.dataset.approve || t.dataset.reject) {
      const id = t.dataset.approve || t.dataset.reject;
      const comment = document.querySelector(`input.comment[data-id="${CSS.escape(id)}"]`)?.value || null;
      await api(`/api/approvals/${encodeURIComponent(id)}/${t.dataset.approve ? "approve" : "reject"}`, { method: "POST", body: { comment } });
    } else if (t.dataset.resolve) {
      const raw = document.querySelector(`input.params[data-id="${CSS.escape(t.dataset.resolve)}"]`)?.value;
      const body = { action: t.dataset.action };
      if (t.dataset.action === "retry" && raw) body.params = JSON.parse(raw);
      await api(`/api/tickets/${encodeURIComponent(t.dataset.resolve)}/resolve`, { method: "POST", body });
    } else if (t.dataset.run) {
      state.openRun = t.dataset.run;
    }
    await refresh();
  } catch (e) {
    status(e.message, true);
  }
});

$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("#key").value.trim();
  sessionStorage.setItem("keel-key", state.key);
  $("#key").value = "";
  refresh();
});

refresh();
setInterval(refresh, 2000);
