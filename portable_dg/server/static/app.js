// The pdg serve web page: a chat over /v1/chat/completions that draws the canvas from the draft
// events (stream_options.include_drafts) as it denoises.  Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const KNOBS = ["max_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max",
               "confidence_threshold", "stability_threshold", "seed"];
const state = { model: null, history: [], controller: null, previous: [] };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) { $("error").textContent = message || ""; }

async function errorMessage(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { showError(await errorMessage(response)); return; }
  const card = (await response.json()).data[0];
  state.model = card;
  $("model").textContent = `${card.id} · ${card.backend} · canvas ${card.canvas_length} tokens`;
  for (const name of KNOBS) {
    const value = card.defaults[name];
    if (value !== undefined) $(name).placeholder = String(value);
  }
  layoutCanvas(card.canvas_length);
  showError("");
}

function layoutCanvas(length) {
  const canvas = $("canvas");
  canvas.replaceChildren();
  const side = Math.round(Math.sqrt(length));
  canvas.classList.toggle("square", side * side === length && side <= 12);
  canvas.style.setProperty("--side", side);
  for (let i = 0; i < length; i++) {
    const cell = document.createElement("span");
    cell.className = "cell";
    canvas.appendChild(cell);
  }
  state.previous = [];
}

function drawCanvas(draft) {
  const canvas = $("canvas");
  if (canvas.children.length !== draft.tokens.length) layoutCanvas(draft.tokens.length);
  canvas.classList.toggle("committed", draft.committed);
  draft.tokens.forEach((piece, i) => {
    const cell = canvas.children[i];
    const special = /^<[^<>]+>$/.test(piece);
    cell.textContent = special ? "·" : piece.replace(/\n/g, "⏎");
    cell.title = piece;
    cell.classList.toggle("special", special);
    cell.classList.toggle("changed", !draft.committed && state.previous[i] !== piece);
  });
  state.previous = draft.tokens;
  canvas.dataset.drafts = String(Number(canvas.dataset.drafts) + 1);
  const what = draft.committed ? "committed" : `step ${draft.step}`;
  $("step").textContent = `canvas ${draft.canvas + 1} · ${what} · accepted ${draft.accepted} · ` +
    `H ${draft.mean_entropy.toFixed(3)} · T ${draft.temperature.toFixed(2)} · ${draft.elapsed_ms.toFixed(0)} ms`;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("history").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function requestBody(messages) {
  const body = { messages, stream: true, stream_options: { include_drafts: true, include_usage: true } };
  if (state.model) body.model = state.model.id;
  for (const name of KNOBS) {
    const raw = $(name).value.trim();
    if (raw !== "") body[name] = Number(raw);
  }
  return body;
}

// Server-sent events from a fetch body: yields {event, data} per event.
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

async function send(text) {
  showError("");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant pending", "…");
  const started = performance.now();
  let answer = "", firstDraft = null, firstText = null, steps = [];
  $("canvas").dataset.drafts = "0";
  for (const id of ["t-draft", "t-text", "t-total", "t-steps"]) $(id).textContent = "–";
  state.controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)),
      signal: state.controller.signal });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const { event, data } of readEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const ms = performance.now() - started;
      if (event === "draft") {
        if (firstDraft === null) { firstDraft = ms; $("t-draft").textContent = ms.toFixed(0) + " ms"; }
        drawCanvas(chunk.draft);
        if (chunk.draft.committed) steps.push(chunk.draft.step);
        $("t-steps").textContent = steps.join(" + ") || String(chunk.draft.step);
        continue;
      }
      if (chunk.usage) reply.dataset.tokens = String(chunk.usage.completion_tokens);
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          if (firstText === null) { firstText = ms; $("t-text").textContent = ms.toFixed(0) + " ms"; }
          answer += choice.delta.content;
          reply.textContent = answer;
        }
        if (choice.finish_reason) reply.dataset.finish = choice.finish_reason;
      }
    }
    const total = performance.now() - started;
    $("t-total").textContent = total.toFixed(0) + " ms";
    reply.classList.remove("pending");
    reply.textContent = answer;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${reply.dataset.tokens || "?"} tokens · ${steps.length} canvas(es) · ` +
      `steps ${steps.join(", ")} · ${(total / 1000).toFixed(2)} s`;
    reply.appendChild(meta);
    reply.dataset.done = "true";
    state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
  } catch (e) {
    reply.remove();
    showError(e.name === "AbortError" ? "stopped" : e.message);
  } finally {
    state.controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

async function pollHealth() {
  try {
    const h = await (await fetch("/health")).json();
    $("status").textContent = `requests ${h.in_flight} · denoising together up to ${h.max_concurrent}`;
  } catch (e) {
    $("status").textContent = "server unreachable";
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("reset").addEventListener("click", () => {
  state.history = [];
  $("history").replaceChildren();
  if (state.model) layoutCanvas(state.model.canvas_length);
  $("step").textContent = "idle";
});
$("api-key").addEventListener("change", loadModel);

loadModel();
pollHealth();
setInterval(pollHealth, 2000);
