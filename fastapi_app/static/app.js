// vlm-serve web page: pick a model and an image, ask, watch the answer stream in.
"use strict";
const $ = (id) => document.getElementById(id);
let image = null;
// The chat's id: kept in this browser once a turn was answered (the server then has the
// session), so a first visit asks for no history that cannot exist.
let sessionId = localStorage.getItem("vlm-session");

function session() {
  if (!sessionId) sessionId = (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random()).replace(/-/g, "");
  return sessionId;
}

// API keys: when the server answers 401, the page asks for a key once and keeps it in
// this browser (localStorage); every call then sends it as a Bearer token.
let apiKey = localStorage.getItem("vlm-api-key") || "";

async function call(url, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey) headers.set("Authorization", `Bearer ${apiKey}`);
  const reply = await fetch(url, { ...options, headers });
  if (reply.status === 401) {
    $("key-pane").hidden = false;
    $("api-key").focus();
    throw new Error(apiKey ? "The API key was refused: enter a valid one." : "This server needs an API key: enter it above.");
  }
  return reply;
}

function useKey(event) {
  event.preventDefault();
  apiKey = $("api-key").value.trim();
  localStorage.setItem("vlm-api-key", apiKey);
  $("api-key").value = "";
  $("key-pane").hidden = true;
  showError("");
  loadModels();
  loadHistory();
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function addEntry(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("log").appendChild(li);
  $("log").scrollTop = $("log").scrollHeight;
  return li;
}

// "model · seconds · tokens" under an answer (turns kept before these were recorded have none)
function addMeta(answer, model, seconds, tokens) {
  const meta = document.createElement("span");
  meta.className = "meta";
  const parts = [model];
  if (seconds != null) parts.push(`${Number(seconds).toFixed(2)} s`);
  if (tokens != null) parts.push(`${tokens} tokens`);
  meta.textContent = parts.join(" · ");
  answer.appendChild(meta);
}

// While no text has come: a waiting line with the model and the seconds spent.
function showWaiting(answer, model) {
  const started = performance.now();
  answer.classList.add("pending");
  const status = document.createElement("span");
  status.className = "status";
  const tick = () => { status.textContent = `waiting for ${model}… ${Math.floor((performance.now() - started) / 1000)} s`; };
  tick();
  answer.appendChild(status);
  const timer = setInterval(tick, 1000);
  return () => {
    clearInterval(timer);
    if (answer.classList.contains("pending")) { answer.classList.remove("pending"); status.remove(); }
  };
}

function showFailed(answer, message) {
  answer.classList.add("failed");
  answer.textContent = message;
  answer.setAttribute("role", "alert");
}

function showHints() {
  for (const hint of document.querySelectorAll(".hint[data-model]")) hint.hidden = hint.dataset.model !== $("model").value;
}

async function loadModels() {
  try {
    const reply = await call("/v1/models");
    const { data } = await reply.json();
    const chosen = $("model").value;  // the page came with the served models; keep the choice
    $("model").innerHTML = "";
    for (const model of data) {
      const option = new Option(model.ready ? model.id : `${model.id} (not ready)`, model.id);
      $("model").add(option);
    }
    const saved = localStorage.getItem("vlm-model");
    if (saved && data.some((m) => m.id === saved)) $("model").value = saved;
    else if (data.some((m) => m.id === chosen)) $("model").value = chosen;
    showHints();
  } catch (err) {
    showError(`Could not list the models: ${err}`);
  }
}

async function loadHistory() {
  if (!sessionId) return;  // nothing answered in this browser yet
  let reply;
  try {
    reply = await call(`/api/sessions/${sessionId}`);
  } catch (err) {
    return;  // loadModels says what is wrong
  }
  if (!reply.ok) return;
  for (const turn of (await reply.json()).turns) {
    addEntry("user", turn.prompt + (turn.had_image ? "  [image]" : ""));
    addMeta(addEntry("assistant", turn.response), turn.model, turn.seconds, turn.completion_tokens);
  }
}

function setImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showError(`${file.name} is not an image`); return; }
  image = file;
  $("preview").src = URL.createObjectURL(file);
  $("preview-wrap").hidden = false;
  $("clear-image").hidden = false;
  clearBoxes();
  showError("");
}

function clearBoxes() {
  const canvas = $("boxes");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  canvas.dataset.drawn = "0";
}

// Kosmos-2 entities and moondream2's /detect carry boxes, moondream2's /point carries points;
// every coordinate is a fraction (0..1) of the image's width or height.
function drawBoxes(entities) {
  const canvas = $("boxes");
  const img = $("preview");
  canvas.width = img.clientWidth;
  canvas.height = img.clientHeight;
  const ctx = canvas.getContext("2d");
  ctx.lineWidth = 2;
  ctx.font = "13px system-ui";
  entities.forEach((entity, i) => {
    ctx.strokeStyle = ctx.fillStyle = `hsl(${(i * 67) % 360} 80% 45%)`;
    for (const [x0, y0, x1, y1] of entity.boxes || []) {
      const x = x0 * canvas.width, y = y0 * canvas.height;
      ctx.strokeRect(x, y, (x1 - x0) * canvas.width, (y1 - y0) * canvas.height);
      ctx.fillText(entity.phrase, x + 3, Math.max(12, y - 3));
    }
    for (const [px, py] of entity.points || []) {
      const x = px * canvas.width, y = py * canvas.height;
      ctx.beginPath();
      ctx.arc(x, y, 5, 0, 2 * Math.PI);
      ctx.fill();
      ctx.fillText(entity.phrase, x + 7, Math.max(12, y - 7));
    }
  });
  canvas.dataset.drawn = String(entities.reduce((n, e) => n + (e.boxes || []).length + (e.points || []).length, 0));
}

async function errorText(reply) {
  try {
    const body = await reply.json();
    return body.detail || (body.error && body.error.message) || JSON.stringify(body);
  } catch {
    return `HTTP ${reply.status}`;
  }
}

async function ask(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) { showError("Type a prompt first."); return; }
  showError("");
  $("send").disabled = true;
  $("send").textContent = "Answering…";
  const model = $("model").value;
  addEntry("user", prompt + (image ? "  [image]" : ""));
  const answer = addEntry("assistant", "");
  const stopWaiting = showWaiting(answer, model);
  const turnSession = session();  // "New chat" while this turn runs starts another: keep that one
  const form = new FormData();
  form.append("session_id", turnSession);
  form.append("model", model);
  form.append("prompt", prompt);
  form.append("stream", "true");
  if (image) form.append("image", image);
  localStorage.setItem("vlm-model", $("model").value);
  try {
    const reply = await call("/api/chat", { method: "POST", body: form });
    if (!reply.ok) throw new Error(await errorText(reply));
    await readEvents(reply, (event) => {
      if (event.type === "chunk") {
        stopWaiting();
        answer.textContent += event.content;
        $("log").scrollTop = $("log").scrollHeight;
      } else if (event.type === "done") {
        stopWaiting();
        answer.textContent = event.response;
        addMeta(answer, event.model, event.seconds, event.usage.completion_tokens);
        if (sessionId === turnSession) localStorage.setItem("vlm-session", turnSession);  // the server has it now
        if (event.entities && event.entities.length && image) drawBoxes(event.entities);
      } else if (event.type === "error") {
        throw new Error(event.message);
      }
    });
    $("prompt").value = "";
  } catch (err) {
    stopWaiting();
    showFailed(answer, String(err.message || err));  // in place of the answer; the prompt stays to retry
  } finally {
    $("send").disabled = false;
    $("send").textContent = "Send";
  }
}

async function readEvents(reply, onEvent) {
  const reader = reply.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setImage(e.dataTransfer.files[0]); });
$("file").addEventListener("change", (e) => setImage(e.target.files[0]));
$("clear-image").addEventListener("click", () => {
  image = null; $("preview-wrap").hidden = true; $("clear-image").hidden = true; $("file").value = "";
});
$("new-chat").addEventListener("click", async () => {
  if (localStorage.getItem("vlm-session")) {  // only a session the server has
    await call(`/api/sessions/${sessionId}`, { method: "DELETE" }).catch(() => {});
    localStorage.removeItem("vlm-session");
  }
  sessionId = null;
  $("log").innerHTML = "";
  showError("");
});
$("model").addEventListener("change", showHints);
$("ask").addEventListener("submit", ask);
$("key-form").addEventListener("submit", useKey);
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) ask(e); });
showHints();
loadModels();
loadHistory();
