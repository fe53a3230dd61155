// The playground: streams completions from POST /v1/completions (stream: true) and colours each token by
// its probability. Plain browser JavaScript, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "gpt2jax.apiKey";
const NUMBER_FIELDS = ["max_tokens", "temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "logprobs"];
const INTEGER_FIELDS = new Set(["max_tokens", "n", "logprobs"]);

let controller = null; // AbortController of the running generation, null when idle

// ---- the request ----

function apiUrl(path) {
  return new URL(path, document.baseURI).href;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function stopSequences() {
  return $("stop").value.split("\n")
    .filter((line) => line !== "")
    .map((line) => line.replaceAll("\\n", "\n").replaceAll("\\t", "\t"));
}

function requestBody() {
  const body = { model: $("model").value, prompt: $("prompt").value };
  for (const name of NUMBER_FIELDS) {
    const raw = $(name).value.trim();
    const value = INTEGER_FIELDS.has(name) ? parseInt(raw, 10) : parseFloat(raw);
    if (raw !== "" && Number.isFinite(value)) body[name] = value;
  }
  const stop = stopSequences();
  if (stop.length) body.stop = stop;
  body.stream = true;
  body.stream_options = { include_usage: true }; // a last chunk with the token counts
  return body;
}

function shellQuote(s) {
  return `'${s.replaceAll("'", "'\\''")}'`;
}

function updateCurl() {
  const lines = [`curl -N ${apiUrl("v1/completions")}`, `  -H 'Content-Type: application/json'`];
  if ($("api-key").value.trim()) lines.push(`  -H "Authorization: Bearer $OPENAI_API_KEY"`);
  lines.push(`  -d ${shellQuote(JSON.stringify(requestBody(), null, 2))}`);
  $("curl").textContent = lines.join(" \\\n");
}

// ---- status and errors ----

function setStatus(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

// The words of an API error: the OpenAI envelope's message when there is one.
async function errorMessage(response) {
  const text = await response.text();
  try {
    const message = JSON.parse(text).error.message;
    if (message) return `${message} (HTTP ${response.status})`;
  } catch {
    // not the error envelope: show the start of the body instead
  }
  return `HTTP ${response.status} ${response.statusText}: ${text.slice(0, 300) || "(empty body)"}`;
}

function networkMessage(err) {
  return `Network error: could not reach the server (${err.message}).`;
}

// ---- models ----

async function loadModels() {
  const select = $("model");
  let response;
  try {
    response = await fetch(apiUrl("v1/models"), { headers: headers() });
  } catch (err) {
    setStatus(networkMessage(err), true);
    return;
  }
  if (!response.ok) {
    const message = await errorMessage(response);
    if (response.status === 401) {
      $("key-box").open = true;
      $("api-key").focus();
      setStatus(`This server needs an API key: enter it above. ${message}`, true);
    } else {
      setStatus(`Could not list models: ${message}`, true);
    }
    return;
  }
  const previous = select.value;
  const models = (await response.json()).data.map((m) => m.id);
  select.replaceChildren(...models.map((id) => new Option(id, id)));
  if (models.includes(previous)) select.value = previous;
  setStatus(models.length ? `Ready. ${models.length} model(s) served.` : "The server serves no model.", !models.length);
  updateCurl();
}

// ---- output ----

// Background colour for probability p: red (unlikely) through yellow to green (likely).
function colour(p) {
  return `hsl(${Math.round(120 * p)} 75% 82%)`;
}

const percent = (logprob) => `${(100 * Math.exp(logprob)).toFixed(1)}%`;

function describeToken(token, logprob, top) {
  let s = `Token ${JSON.stringify(token)}: p = ${percent(logprob)}, logprob = ${logprob.toFixed(3)}`;
  const alternatives = Object.entries(top || {})
    .sort((a, b) => b[1] - a[1])
    .map(([t, lp]) => `${JSON.stringify(t)} ${percent(lp)}`);
  if (alternatives.length) s += `\nTop: ${alternatives.join(", ")}`;
  return s;
}

function makeChoiceBox(index, prompt) {
  const box = document.createElement("div");
  box.className = "choice";
  box.innerHTML = `<h3>Choice ${index + 1} <span class="finish"></span></h3><pre class="completion"></pre>`;
  const pre = box.querySelector("pre");
  const promptSpan = document.createElement("span");
  promptSpan.className = "prompt-text";
  promptSpan.textContent = prompt;
  pre.append(promptSpan);
  $("outputs").append(box);
  return { pre, finish: box.querySelector(".finish"), length: 0, origin: null };
}

// Splits a chunk's text into per-token pieces using the legacy logprobs' text_offset.
function tokenPieces(choice, text, lp) {
  if (!lp || !lp.tokens || !lp.tokens.length || !lp.text_offset) return [{ text }];
  if (choice.origin === null) choice.origin = lp.text_offset[0] - choice.length;
  const starts = lp.text_offset.map((o) => o - choice.origin - choice.length);
  if (starts.some((s, i) => s < 0 || (i && s < starts[i - 1]))) return [{ text }];
  const pieces = [];
  if (starts[0] > 0) pieces.push({ text: text.slice(0, starts[0]) });
  starts.forEach((start, i) => {
    pieces.push({
      text: text.slice(start, i + 1 < starts.length ? starts[i + 1] : text.length), // "" past a stop string
      token: lp.tokens[i],
      logprob: lp.token_logprobs[i],
      top: lp.top_logprobs ? lp.top_logprobs[i] : null,
    });
  });
  return pieces;
}

function appendText(choice, text, lp) {
  for (const piece of tokenPieces(choice, text, lp)) {
    if (!piece.text) continue; // e.g. a token ending inside a multi-byte character
    if (typeof piece.logprob !== "number") {
      choice.pre.append(piece.text);
      continue;
    }
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = piece.text;
    span.style.background = colour(Math.exp(piece.logprob));
    span.title = describeToken(piece.token, piece.logprob, piece.top);
    choice.pre.append(span);
  }
  choice.length += text.length;
}

function showTokenInfo(event) {
  const tok = event.target.closest(".tok");
  if (tok) $("token-info").textContent = tok.title;
}

// ---- streaming ----

// Yields the data of each Server-Sent Event in the response body.
async function* sseData(response) {
  const reader = response.body.getReader(); // aborting the fetch makes read() reject
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replaceAll("\r\n", "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5));
        if (data.length) yield data.join("\n");
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // the caller stopped early: close the connection
  }
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop-button").disabled = !running;
  $("form").setAttribute("aria-busy", String(running));
}

async function generate() {
  const body = requestBody();
  controller = new AbortController();
  const signal = controller.signal;
  setRunning(true);
  setStatus("Generating…");
  $("outputs").replaceChildren();
  $("token-info").textContent = "Hover a token to see its probability.";
  const choices = new Map();
  const choiceFor = (i) => choices.get(i) || choices.set(i, makeChoiceBox(i, body.prompt)).get(i);
  let finished = false;
  let usage = null;
  try {
    const response = await fetch(apiUrl("v1/completions"), {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal,
    });
    if (!response.ok) {
      setStatus(await errorMessage(response), true);
      return;
    }
    for await (const data of sseData(response)) {
      if (data === "[DONE]") {
        finished = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) {
        setStatus(chunk.error.message || JSON.stringify(chunk.error), true);
        return;
      }
      for (const c of chunk.choices || []) {
        const choice = choiceFor(c.index);
        if (c.text) appendText(choice, c.text, c.logprobs);
        if (c.finish_reason) choice.finish.textContent = `(finish_reason: ${c.finish_reason})`;
      }
      if (chunk.usage) usage = chunk.usage;
    }
    if (signal.aborted) {
      setStatus("Stopped.");
    } else if (finished) {
      setStatus(usage ? `Done. ${usage.completion_tokens} tokens generated.` : "Done.");
    } else {
      setStatus("The server closed the stream before [DONE]; the output may be incomplete.", true);
    }
  } catch (err) {
    if (signal.aborted) setStatus("Stopped.");
    else if (err instanceof TypeError) setStatus(networkMessage(err), true);
    else setStatus(`Error: ${err.message}`, true);
  } finally {
    controller = null;
    setRunning(false);
  }
}

// ---- wiring ----

function init() {
  const stored = localStorage.getItem(KEY_STORAGE);
  if (stored) {
    $("api-key").value = stored;
    $("remember-key").checked = true;
  }
  const saveKey = () => {
    if ($("remember-key").checked) localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    else localStorage.removeItem(KEY_STORAGE);
  };
  $("remember-key").addEventListener("change", saveKey);
  $("api-key").addEventListener("change", () => {
    saveKey();
    loadModels();
  });
  $("form").addEventListener("input", updateCurl);
  $("form").addEventListener("change", updateCurl);
  $("api-key").addEventListener("input", updateCurl);
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!controller) generate();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
  });
  $("stop-button").addEventListener("click", () => controller && controller.abort());
  $("outputs").addEventListener("mouseover", showTokenInfo);
  $("copy-curl").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("curl").textContent);
      $("copy-curl").textContent = "Copied";
    } catch {
      getSelection().selectAllChildren($("curl")); // no clipboard (plain http): select it for Ctrl+C
      $("copy-curl").textContent = "Press Ctrl+C";
    }
    setTimeout(() => ($("copy-curl").textContent = "Copy"), 1500);
  });
  updateCurl();
  loadModels();
}

init();
