// nanoseek chat page: plain JS, no build step. It is an ordinary client of the public API
// (POST /v1/chat/completions with stream: true), so whatever works here works for any client.
"use strict";

const STORE = "nanoseek.chat.v1";
const $ = (id) => document.getElementById(id);
const state = load();
let controller = null; // AbortController of the stream in progress (the stop button)

function load() {
  try {
    const s = JSON.parse(localStorage.getItem(STORE));
    if (s && Array.isArray(s.messages)) return s;
  } catch (e) { /* a corrupt entry must not break the page */ }
  return { messages: [], settings: {} };
}
function save() { localStorage.setItem(STORE, JSON.stringify(state)); }

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; // textContent only: model output is never parsed as HTML
  return e;
}

function fmtCost(usd) { return usd < 0.01 ? `$${usd.toFixed(6)}` : `$${usd.toFixed(4)}`; }
function fmtUsage(u) {
  if (!u) return "";
  const r = u.completion_tokens_details ? u.completion_tokens_details.reasoning_tokens : 0;
  const cost = u.cost ? ` · ${fmtCost(u.cost.total)}` : "";
  return `${u.prompt_tokens} prompt (${u.prompt_cache_hit_tokens} cached) · ${u.completion_tokens} completion` +
         (r ? ` (${r} reasoning)` : "") + cost;
}

// A reply's tool calls, one line each: name(arguments).
function renderCalls(list, calls) {
  list.replaceChildren(...(calls || []).map((c) => {
    const row = el("div", "toolcall", `${c.function.name}(${c.function.arguments})`);
    row.dataset.testid = "toolcall";
    return row;
  }));
  list.hidden = !(calls && calls.length);
}

// One assistant bubble: collapsible thinking, content, tool calls, usage line. Returns setters for streaming.
function renderAssistant(m) {
  const box = el("div", "msg assistant");
  box.dataset.testid = "assistant";
  const think = el("details", "thinking");
  think.dataset.testid = "thinking";
  think.open = !!m.streaming;
  const sum = el("summary", "", "thinking");
  const tbody = el("div", "think-body", m.reasoning || "");
  think.append(sum, tbody);
  think.hidden = !m.reasoning;
  const content = el("div", "content", m.content || "");
  content.dataset.testid = "content";
  const calls = el("div", "toolcalls");
  calls.dataset.testid = "toolcalls";
  renderCalls(calls, m.tool_calls);
  const meta = el("div", "meta", fmtUsage(m.usage) + (m.stopped ? " · stopped" : ""));
  meta.dataset.testid = "meta";
  box.append(think, content, calls, meta);
  if (m.streaming) box.classList.add("streaming");
  return { box, think, tbody, content, calls, meta };
}

function render() {
  const log = $("log");
  log.replaceChildren();
  for (const m of state.messages) {
    if (m.role === "user") {
      const u = el("div", "msg user", m.content);
      u.dataset.testid = "user";
      log.append(u);
    } else if (m.role === "error") {
      log.append(el("div", "msg error", m.content));
    } else {
      log.append(renderAssistant(m).box);
    }
  }
  const spent = state.messages.reduce((s, m) => s + (m.usage && m.usage.cost ? m.usage.cost.total : 0), 0);
  const toks = state.messages.reduce((s, m) => s + (m.usage ? m.usage.total_tokens : 0), 0);
  $("totals").textContent = toks ? `conversation: ${toks} tokens · ${fmtCost(spent)}` : "";
  log.scrollTop = log.scrollHeight;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function loadModels() {
  const sel = $("model");
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    sel.replaceChildren(...body.data.map((m) => el("option", "", m.id)));
  } catch (e) {
    sel.replaceChildren(el("option", "", "nanoseek"));
  }
  if (state.settings.model) sel.value = state.settings.model;
}

// Server-sent events over fetch: split on blank lines, skip ": keep-alive" comments.
async function* sse(response) {
  const reader = response.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  const history = state.messages.filter((m) => m.role === "user" || m.role === "assistant")
    .map((m) => (m.tool_calls && m.tool_calls.length  // never send reasoning back (a 400)
      ? { role: m.role, content: m.content || null, tool_calls: m.tool_calls }
      : { role: m.role, content: m.content || "" }));
  const m = { role: "assistant", content: "", reasoning: "", usage: null, streaming: true, tool_calls: [] };
  state.messages.push(m);
  render();
  const view = renderAssistant(m);
  $("log").lastChild.replaceWith(view.box);
  setBusy(true);
  controller = new AbortController();
  const body = {
    model: $("model").value || "nanoseek", messages: history, stream: true,
    stream_options: { include_usage: true }, thinking: $("think").checked,
    temperature: Number($("temperature").value || 0.7),
  };
  if ($("maxtokens").value) body.max_tokens = Number($("maxtokens").value);
  try {
    if ($("tools").value.trim()) {  // OpenAI's tools list, as JSON
      try { body.tools = JSON.parse($("tools").value); } catch (e) { throw new Error(`tools: not JSON (${e.message})`); }
      body.tool_choice = $("toolchoice").value;
    }
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      let msg = `HTTP ${r.status}`;
      try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    for await (const data of sse(r)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) m.usage = chunk.usage;
      for (const c of chunk.choices || []) {
        const d = c.delta || {};
        if (d.reasoning_content) { m.reasoning += d.reasoning_content; view.tbody.textContent = m.reasoning; view.think.hidden = false; }
        if (d.content) {
          if (!m.content && m.reasoning) view.think.open = false; // answer started: fold the thinking
          m.content += d.content; view.content.textContent = m.content;
        }
        for (const t of d.tool_calls || []) {  // each call arrives whole
          m.tool_calls[t.index] = { id: t.id, type: "function", function: t.function };
          renderCalls(view.calls, m.tool_calls);
        }
      }
      $("log").scrollTop = $("log").scrollHeight;
    }
  } catch (e) {
    if (e.name === "AbortError") m.stopped = true;
    else state.messages.push({ role: "error", content: String(e.message || e) });
  } finally {
    m.streaming = false;
    controller = null;
    setBusy(false);
    save();
    render();
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = busy;
}

function init() {
  const s = state.settings;
  if (s.apikey) $("apikey").value = s.apikey;
  if (s.temperature !== undefined) $("temperature").value = s.temperature;
  if (s.maxtokens) $("maxtokens").value = s.maxtokens;
  if (s.tools) $("tools").value = s.tools;
  if (s.toolchoice) $("toolchoice").value = s.toolchoice;
  $("think").checked = !!s.think;
  for (const id of ["apikey", "temperature", "maxtokens", "think", "model", "tools", "toolchoice"]) {
    $(id).addEventListener("change", () => {
      state.settings[id] = id === "think" ? $(id).checked : $(id).value;
      save();
      if (id === "apikey") loadModels();
    });
  }
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new").addEventListener("click", () => { if (!controller) { state.messages = []; save(); render(); } });
  loadModels();
  render();
}

init();
