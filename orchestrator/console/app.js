// The orchestrator's web console: the saga list, the stuck view and each
// saga's timeline, over the JSON of /ui/api/. No framework and no build
// step: the binary serves this file as written. Everything shown is set as
// text (never as HTML), since ids, reasons and details come from clients.
"use strict";

const TOKEN_KEY = "saga-console-token";
const OPERATOR_KEY = "saga-console-operator";
const REFRESH_MS = 1500;

const $ = (id) => document.getElementById(id);

// An element with attributes and children (strings become text nodes).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "style") Object.assign(node.style, value);
    else if (name.startsWith("data-")) node.setAttribute(name, String(value));
    else node[name] = value;
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// ---- the token, kept in this tab only ----

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
function operator() { return sessionStorage.getItem(OPERATOR_KEY) || ""; }

function askForToken(why) {
  $("token-why").textContent = why;
  $("token-form").hidden = false;
  $("token-input").value = token();
  $("operator-input").value = operator();
  $("token-input").focus();
}

class ApiError extends Error {
  constructor(http, status, message) {
    super(message);
    this.http = http;
    this.status = status;
  }
}

async function api(path, options) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = "Bearer " + token();
  if (options && options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: (options && options.method) || "GET",
    headers,
    body: options && options.body !== undefined ? JSON.stringify(options.body) : undefined,
    cache: "no-store",
  });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const error = (body && body.error) || {};
    throw new ApiError(response.status, error.status || String(response.status),
      error.message || response.statusText);
  }
  return body;
}

// What an error means to the operator; asks for a token when one is needed.
function showError(error) {
  if (error instanceof ApiError && error.http === 401) {
    askForToken(token() ? "That token was refused: " + error.message
      : "This orchestrator needs a token to show sagas.");
    return;
  }
  if (error instanceof ApiError && error.http === 403) {
    askForToken(error.message);
    return;
  }
  $("error").textContent = error.message || String(error);
  $("error").hidden = false;
}

function clearError() { $("error").hidden = true; }

// ---- formatting ----

function time(ms) {
  if (ms === null || ms === undefined) return "";
  const d = new Date(ms);
  return d.toLocaleString(undefined, { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function ago(ms) {
  if (!ms) return "";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return s.toFixed(0) + "s ago";
  if (s < 3600) return (s / 60).toFixed(0) + "m ago";
  if (s < 86400) return (s / 3600).toFixed(1) + "h ago";
  return (s / 86400).toFixed(1) + "d ago";
}

function took(ms) {
  if (ms === null || ms === undefined) return "";
  if (ms < 1000) return ms.toFixed(0) + " ms";
  if (ms < 60000) return (ms / 1000).toFixed(2) + " s";
  return (ms / 60000).toFixed(1) + " min";
}

function cents(value) { return (value / 100).toFixed(2); }

const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);

// ---- the list and the stuck view ----

const list = { stuck: false, tokens: [""], filters: { status: "", customer_id: "", product_id: "" }, next: "" };

function listQuery() {
  const params = new URLSearchParams();
  if (list.stuck) params.set("stuck", "true");
  else {
    for (const [name, value] of Object.entries(list.filters)) if (value) params.set(name, value);
  }
  params.set("page_size", "25");
  const page = list.tokens[list.tokens.length - 1];
  if (page) params.set("page_token", page);
  return "/ui/api/sagas?" + params.toString();
}

async function loadList() {
  const page = await api(listQuery());
  const rows = page.sagas.map((s) =>
    el("tr", { "data-saga-id": s.saga_id, "data-status": s.status },
      el("td", { class: "id" }, el("a", { href: "#/saga/" + encodeURIComponent(s.saga_id) }, s.saga_id)),
      el("td", {}, el("span", { class: "status " + s.status }, s.status)),
      el("td", { class: "customer" }, s.customer_id),
      el("td", {}, s.current_step),
      el("td", {}, s.attempts || ""),
      el("td", { class: "why" }, s.stuck_reason),
      el("td", { class: "error" }, s.last_error),
      el("td", { title: time(s.created_at_ms) }, ago(s.created_at_ms)),
      el("td", { title: time(s.updated_at_ms) }, ago(s.updated_at_ms))));
  $("sagas").querySelector("tbody").replaceChildren(...rows);
  $("sagas").classList.toggle("stuck", list.stuck);
  $("empty").hidden = rows.length > 0;
  $("empty").textContent = list.stuck ? "Nothing is stuck." : "No sagas match.";
  list.next = page.next_page_token;
  $("page-next").disabled = !list.next;
  $("page-prev").disabled = list.tokens.length <= 1;
  $("page-first").disabled = list.tokens.length <= 1;
}

async function loadCounts() {
  const stats = await api("/ui/api/stats");
  const parts = [el("span", {}, "in flight here: " + stats.in_flight)];
  for (const [status, count] of Object.entries(stats.counts).sort()) {
    parts.push(el("span", { class: "count", "data-status": status }, status + " " + count));
  }
  $("counts").replaceChildren(...parts);
}

// ---- one saga ----

let shown = null; // the saga on screen

function fact(name, ...value) { return [el("dt", {}, name), el("dd", {}, ...value)]; }

function renderFacts(saga) {
  const s = saga.saga;
  const facts = [
    fact("customer", s.customer_id),
    fact("items", saga.items.map((i) => i.product_id + " × " + i.quantity).join(", ")),
    fact("total", saga.total_amount_cents ? cents(saga.total_amount_cents) : "—"),
    fact("placed", time(s.created_at_ms)),
  ];
  if (saga.finished_at_ms) facts.push(fact("finished", time(saga.finished_at_ms)));
  if (s.current_step) facts.push(fact("step", s.current_step + (s.attempts ? " (attempt " + s.attempts + ")" : "")));
  if (saga.failure_reason) facts.push(fact("reason", saga.failure_reason));
  if (s.stuck_reason) facts.push(fact("why stuck", s.stuck_reason));
  if (s.last_error) facts.push(fact("last error", s.last_error));
  if (s.next_attempt_at_ms) facts.push(fact("next attempt", time(s.next_attempt_at_ms)));
  if (s.lease_owner) facts.push(fact("driven by", s.lease_owner));
  if (saga.cancel_requested) facts.push(fact("cancel", "requested"));
  if (saga.idempotency_key) facts.push(fact("idempotency key", saga.idempotency_key));
  facts.push(fact("trace id", el("code", { id: "saga-trace" }, saga.trace_id || "— (tracing off)")));
  for (const [name, value] of saga.step_outputs) facts.push(fact(name, value));
  $("saga-facts").replaceChildren(...facts.flat());
}

// Every attempt and compensation as a bar on one time axis, in journal
// order; control entries (cancel, retry, abort) as markers with who and why.
function renderTimeline(saga) {
  const now = Date.now();
  const entries = saga.journal;
  const live = !TERMINAL.has(saga.saga.status);
  let start = saga.saga.created_at_ms;
  let end = start;
  for (const e of entries) {
    start = Math.min(start, e.started_at_ms);
    end = Math.max(end, e.finished_at_ms ?? now, e.started_at_ms);
  }
  if (live) end = Math.max(end, now);
  const span = Math.max(end - start, 1);
  const at = (ms) => ((ms - start) / span) * 100;

  const rows = entries.map((e, index) => {
    const track = el("div", { class: "track" });
    const tip = [e.step, e.kind.toLowerCase(), "attempt " + e.attempt, e.outcome, e.code,
      e.finished_at_ms ? took(e.finished_at_ms - e.started_at_ms) : "in flight", e.detail, e.rpc, e.actor]
      .filter(Boolean).join(" · ");
    if (e.kind === "CONTROL") {
      // The note reads away from the nearer edge: rightwards from a
      // marker in the left half, leftwards from one in the right half.
      const x = at(e.started_at_ms);
      const side = x <= 50 ? { left: x + "%" } : { right: (100 - x) + "%" };
      track.append(
        el("div", { class: "marker", title: tip, "data-step": e.step, style: { left: x + "%" } }),
        el("div", { class: "note", style: side },
          e.step + " by " + e.actor + (e.detail ? ": " + e.detail : "")));
    } else {
      const finished = e.finished_at_ms ?? now;
      track.append(el("div", {
        class: "bar " + e.kind + " " + e.outcome,
        title: tip,
        "data-step": e.step, "data-kind": e.kind, "data-outcome": e.outcome,
        "data-attempt": e.attempt, "data-code": e.code, "data-index": index,
        style: { left: at(e.started_at_ms) + "%", width: Math.max(at(finished) - at(e.started_at_ms), 0.4) + "%" },
      }));
    }
    const label = e.kind === "CONTROL" ? e.step : e.step + " · " + e.kind.toLowerCase() + " #" + e.attempt;
    return el("div", { class: "row", "data-kind": e.kind },
      el("div", { class: "label", title: label }, label), track);
  });
  const ticks = el("div", { class: "ticks" });
  for (const f of [0, 0.25, 0.5, 0.75, 1]) {
    ticks.append(el("span", { style: { left: f * 100 + "%" } }, "+" + took(f * span)));
  }
  const legend = el("div", { class: "legend" },
    el("span", {}, el("i", { style: { background: "var(--ok)" } }), "succeeded"),
    el("span", {}, el("i", { style: { background: "var(--retry)" } }), "retryable failure"),
    el("span", {}, el("i", { style: { background: "var(--rejected)" } }), "rejected"),
    el("span", {}, el("i", { style: { background: "var(--flight)" } }), "in flight"),
    el("span", {}, el("i", { style: { background: "var(--control)" } }), "control request"),
    el("span", {}, "striped: compensation"));
  $("timeline").replaceChildren(...rows, el("div", { class: "axis" }, el("div", {}), ticks), legend);
}

function renderJournal(saga) {
  const rows = saga.journal.map((e, index) => el("tr", { "data-kind": e.kind, "data-outcome": e.outcome },
    el("td", {}, index + 1),
    el("td", {}, time(e.started_at_ms)),
    el("td", {}, e.kind === "CONTROL" ? "" : e.finished_at_ms ? took(e.finished_at_ms - e.started_at_ms) : "in flight"),
    el("td", {}, e.step),
    el("td", {}, e.kind.toLowerCase()),
    el("td", {}, e.kind === "CONTROL" ? "" : e.attempt),
    el("td", {}, e.outcome.toLowerCase().replace("_", " ")),
    el("td", {}, e.code),
    el("td", { class: "detail" }, e.detail),
    el("td", {}, e.actor)));
  $("journal").querySelector("tbody").replaceChildren(...rows);
}

async function loadSaga(id) {
  const saga = await api("/ui/api/sagas/" + encodeURIComponent(id));
  shown = saga;
  $("saga-id").textContent = saga.saga.saga_id;
  $("saga-status").textContent = saga.saga.status;
  $("saga-status").className = "status " + saga.saga.status;
  renderFacts(saga);
  renderTimeline(saga);
  renderJournal(saga);
  const terminal = TERMINAL.has(saga.saga.status);
  $("retry").disabled = terminal;
  $("abort").disabled = terminal;
}

async function operate(action) {
  if (!shown) return;
  const id = shown.saga.saga_id;
  const reason = action === "abort" ? $("abort-reason").value.trim() : "";
  if (action === "abort" && !reason) {
    $("action-result").textContent = "Say why the saga is aborted.";
    $("abort-reason").focus();
    return;
  }
  $("action-result").textContent = action + "…";
  try {
    const reply = await api("/ui/api/sagas/" + encodeURIComponent(id) + "/" + action, {
      method: "POST",
      body: { operator: operator(), reason },
    });
    $("action-result").textContent = reply.message;
    clearError();
    await loadSaga(id);
  } catch (error) {
    $("action-result").textContent = "";
    if (error instanceof ApiError && (error.http === 401 || error.http === 403)) {
      askForToken(action[0].toUpperCase() + action.slice(1) + " needs the operator token: " + error.message);
    } else {
      showError(error);
    }
  }
}

// ---- routing and refresh ----

function route() {
  const hash = location.hash || "#/";
  const saga = hash.match(/^#\/saga\/(.+)$/);
  $("list-view").hidden = !!saga;
  $("saga-view").hidden = !saga;
  $("nav-sagas").classList.toggle("current", hash === "#/");
  $("nav-stuck").classList.toggle("current", hash === "#/stuck");
  if (saga) return { view: "saga", id: decodeURIComponent(saga[1]) };
  const stuck = hash === "#/stuck";
  if (stuck !== list.stuck) list.tokens = [""];
  list.stuck = stuck;
  $("filters").hidden = stuck;
  $("list-title").textContent = stuck ? "Stuck and needing attention" : "All sagas";
  return { view: "list" };
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const where = route();
    if (where.view === "saga") await loadSaga(where.id);
    else await loadList();
    await loadCounts();
    clearError();
  } catch (error) {
    showError(error);
  } finally {
    busy = false;
  }
}

function start() {
  window.addEventListener("hashchange", () => { shown = null; refresh(); });
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    list.filters = {
      status: $("f-status").value,
      customer_id: $("f-customer").value.trim(),
      product_id: $("f-product").value.trim(),
    };
    list.tokens = [""];
    refresh();
  });
  $("page-next").addEventListener("click", () => { if (list.next) { list.tokens.push(list.next); refresh(); } });
  $("page-prev").addEventListener("click", () => { if (list.tokens.length > 1) { list.tokens.pop(); refresh(); } });
  $("page-first").addEventListener("click", () => { list.tokens = [""]; refresh(); });
  $("token-button").addEventListener("click", () => askForToken("Token for this orchestrator (read-only or operator)."));
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    sessionStorage.setItem(OPERATOR_KEY, $("operator-input").value.trim());
    $("token-form").hidden = true;
    refresh();
  });
  $("token-clear").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token-input").value = "";
    $("token-form").hidden = true;
    refresh();
  });
  $("retry").addEventListener("click", () => operate("retry"));
  $("abort").addEventListener("click", () => operate("abort"));
  refresh();
  setInterval(() => {
    if ($("live").checked && $("token-form").hidden && !document.hidden) refresh();
  }, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
