// gemma-jax playground: builds a Workers AI body, POSTs it to the run route and shows the answer.
// Streams are read with fetch + ReadableStream and parsed as server-sent events, so text appears as
// it is generated. Errors are shown exactly as the API returns them (the JSON envelope).
"use strict";

const $ = (id) => document.getElementById(id);
const ACCOUNT = "playground";
const PARAMS = { max_tokens: "int", temperature: "float", top_p: "float", top_k: "int", seed: "int",
                 repetition_penalty: "float", frequency_penalty: "float", presence_penalty: "float" };
let model = "@hf/google/gemma-7b-it";
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const token = $("token").value.trim();
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) { setStatus("models: " + ((body.error && body.error.message) || r.status)); return; }
    const [base, ...adapters] = body.data;
    model = base.id;
    $("model-name").textContent = model;
    const select = $("lora");
    const chosen = select.value;
    select.innerHTML = '<option value="">(base model)</option>';
    for (const a of adapters) {
      const opt = document.createElement("option");
      opt.value = a.id; opt.textContent = a.id + (a.finetune_id ? "  (" + a.finetune_id + ")" : "");
      select.appendChild(opt);
    }
    select.value = chosen;
    setStatus("");
  } catch (e) { setStatus("models: " + e); }
}

function addMessage(role = "user", content = "") {
  const div = document.createElement("div");
  div.className = "message";
  div.innerHTML = '<div class="row"><select class="role"><option>system</option><option>user</option>' +
    '<option>assistant</option></select><button type="button" class="remove" title="remove">✕</button></div>' +
    '<textarea class="content" placeholder="content"></textarea>';
  div.querySelector(".role").value = role;
  div.querySelector(".content").value = content;
  div.querySelector(".remove").onclick = () => { div.remove(); showBody(); };
  div.addEventListener("input", showBody);
  $("messages").appendChild(div);
}

function buildBody() {
  const body = {};
  if ($("mode-messages").checked) {
    body.messages = [...document.querySelectorAll("#messages .message")].map((m) => ({
      role: m.querySelector(".role").value, content: m.querySelector(".content").value }));
  } else {
    body.prompt = $("prompt").value;
    if ($("raw").checked) body.raw = true;
  }
  if ($("lora").value) body.lora = $("lora").value;
  if ($("stream").checked) body.stream = true;
  for (const [key, kind] of Object.entries(PARAMS)) {
    const v = $(key).value.trim();
    if (v !== "") body[key] = kind === "int" ? parseInt(v, 10) : parseFloat(v);
  }
  return body;
}

function showBody() { $("request").textContent = JSON.stringify(buildBody(), null, 2); }

function showError(envelope) {
  $("error").textContent = typeof envelope === "string" ? envelope : JSON.stringify(envelope, null, 2);
}

function showUsage(u) {
  $("usage").textContent = "prompt_tokens " + u.prompt_tokens + " · completion_tokens " + u.completion_tokens +
    " · total_tokens " + u.total_tokens;
}

async function readStream(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;  // comments (keep-alive) and other fields
        const data = line.slice(6);
        if (data === "[DONE]") { setStatus("done"); return; }
        const event = JSON.parse(data);
        if (event.errors) { showError(event); setStatus("failed"); return; }
        if (event.response) $("output").textContent += event.response;
        if (event.usage) showUsage(event.usage);
      }
    }
  }
  setStatus("stream ended without [DONE]");
}

async function run() {
  const body = buildBody();
  showBody();
  $("output").textContent = ""; $("usage").textContent = ""; $("error").textContent = "";
  $("run").disabled = true; $("stop").disabled = false;
  controller = new AbortController();
  setStatus("running…");
  const url = "/client/v4/accounts/" + ACCOUNT + "/ai/run/" + model;
  try {
    const r = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(body),
                                 signal: controller.signal });
    const type = r.headers.get("Content-Type") || "";
    if (r.ok && type.startsWith("text/event-stream")) {
      setStatus("streaming…");
      await readStream(r);
    } else {
      const text = await r.text();
      let envelope;
      try { envelope = JSON.parse(text); } catch (e) { envelope = text; }
      if (r.ok && envelope.success) {
        $("output").textContent = envelope.result.response;
        showUsage(envelope.result.usage);
        setStatus("done");
      } else {
        showError(envelope);
        setStatus("HTTP " + r.status);
      }
    }
  } catch (e) {
    setStatus(e.name === "AbortError" ? "stopped" : "error");
    if (e.name !== "AbortError") showError(String(e));
  } finally {
    $("run").disabled = false; $("stop").disabled = true; controller = null;
  }
}

function setMode() {
  const messages = $("mode-messages").checked;
  $("messages-box").classList.toggle("hidden", !messages);
  $("prompt-box").classList.toggle("hidden", messages);
  showBody();
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = localStorage.getItem("gemma-jax-token") || "";
  $("token").addEventListener("change", () => { localStorage.setItem("gemma-jax-token", $("token").value); loadModels(); });
  $("mode-prompt").onchange = setMode;
  $("mode-messages").onchange = setMode;
  $("add-message").onclick = () => { addMessage("user", ""); showBody(); };
  $("refresh").onclick = loadModels;
  $("run").onclick = run;
  $("stop").onclick = () => controller && controller.abort();
  document.querySelector("main section").addEventListener("input", showBody);
  document.querySelector("main section").addEventListener("change", showBody);
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
  addMessage("system", "You are a helpful assistant.");
  addMessage("user", "");
  showBody();
  loadModels();
});
