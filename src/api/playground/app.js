// The mmserve playground's behaviour: lists the models (GET /v1/models), streams a chat answer
// (POST /v1/chat/completions, SSE read through fetch) with its time to first token and decode
// speed, and ranks images against a text query by cosine of their embeddings (POST /v1/embeddings).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { chatImage: null, embedImages: [], abort: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// The OpenAI-shaped error of a failed response, as one line.
async function errorText(resp) {
  try {
    const body = await resp.json();
    return `${resp.status} ${body.error.code || body.error.type}: ${body.error.message}`;
  } catch (_) {
    return `${resp.status} ${resp.statusText}`;
  }
}

async function loadModels() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) {
    $("server-error").textContent = "Listing the models failed: " + (await errorText(resp));
    $("server-error").hidden = false;
    return;
  }
  $("server-error").hidden = true;
  const models = (await resp.json()).data;
  for (const [select, kind] of [[$("chat-model"), "chat"], [$("embed-model"), "embedding"]]) {
    select.replaceChildren();
    for (const m of models.filter((m) => m.kind === kind)) {
      select.append(new Option(m.id, m.id));
    }
  }
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({ name: file.name, url: reader.result });
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// Calls `onFiles` with the image files dropped on `zone` or picked in `input`.
function imageInput(zone, input, onFiles) {
  const take = (files) => onFiles([...files].filter((f) => f.type.startsWith("image/")));
  input.addEventListener("change", () => take(input.files));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    take(e.dataTransfer.files);
  });
}

// Yields the JSON payload of each `data:` event of an SSE body until `[DONE]`.
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function chatStats(sent, first, end, tokens) {
  if (first === null) return "no tokens";
  const parts = [`TTFT ${(first - sent).toFixed(0)} ms`, `${tokens} tokens`];
  if (tokens > 1 && end > first) {
    parts.push(`${((tokens - 1) / ((end - first) / 1000)).toFixed(1)} tokens/s after the first`);
  }
  parts.push(`total ${((end - sent) / 1000).toFixed(2)} s`);
  return parts.join(" · ");
}

async function ask() {
  const content = [{ type: "text", text: $("chat-question").value }];
  if (state.chatImage) content.unshift({ type: "image_url", image_url: { url: state.chatImage.url } });
  const request = {
    model: $("chat-model").value,
    messages: [{ role: "user", content }],
    max_tokens: Number($("chat-max-tokens").value),
    temperature: Number($("chat-temperature").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  const answer = $("chat-answer");
  answer.textContent = "";
  answer.classList.remove("error");
  $("chat-stats").textContent = "waiting…";
  state.abort = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  const sent = performance.now();
  let first = null;
  let tokens = 0;
  let usage = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: state.abort.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const chunk of sseEvents(resp.body)) {
      if (chunk.error) throw new Error(`${chunk.error.code || chunk.error.type}: ${chunk.error.message}`);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        if (first === null) first = performance.now();
        tokens += 1;
        answer.textContent += delta;
        $("chat-stats").textContent = chatStats(sent, first, performance.now(), tokens);
      }
    }
    const n = usage ? usage.completion_tokens : tokens;
    $("chat-stats").textContent = chatStats(sent, first, performance.now(), n);
    answer.dataset.done = "true";
  } catch (e) {
    if (e.name !== "AbortError") {
      answer.classList.add("error");
      answer.textContent += (answer.textContent ? "\n" : "") + e.message;
    }
    $("chat-stats").textContent = chatStats(sent, first, performance.now(), tokens);
  } finally {
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
}

async function embed(input) {
  const resp = await fetch("/v1/embeddings", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ model: $("embed-model").value, input, encoding_format: "float" }),
  });
  if (!resp.ok) throw new Error(await errorText(resp));
  return (await resp.json()).data.map((d) => d.embedding);
}

// The vectors are L2-normalised by the server: the dot product is the cosine.
const dot = (a, b) => a.reduce((s, x, i) => s + x * b[i], 0);

async function rank() {
  const list = $("embed-results");
  list.replaceChildren();
  $("embed-stats").classList.remove("error");
  if (!state.embedImages.length) {
    $("embed-stats").textContent = "Pick or drop some images first.";
    return;
  }
  $("embed-stats").textContent = "embedding…";
  const start = performance.now();
  try {
    const parts = state.embedImages.map((img) => ({ type: "image_url", image_url: { url: img.url } }));
    const [images, [query]] = await Promise.all([embed(parts), embed($("embed-query").value)]);
    const ranked = state.embedImages
      .map((img, i) => ({ img, score: dot(query, images[i]) }))
      .sort((a, b) => b.score - a.score);
    for (const { img, score } of ranked) {
      const li = document.createElement("li");
      const thumb = new Image();
      thumb.src = img.url;
      li.append(thumb, `${score.toFixed(3)} ${img.name}`);
      list.append(li);
    }
    const ms = (performance.now() - start).toFixed(0);
    $("embed-stats").textContent = `${images.length} images and the query, ${query.length}-d vectors, ${ms} ms`;
  } catch (e) {
    $("embed-stats").classList.add("error");
    $("embed-stats").textContent = e.message;
  }
}

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  $("chat").hidden = name !== "chat";
  $("embed").hidden = name !== "embed";
}

imageInput($("chat-drop"), $("chat-image"), async (files) => {
  if (!files.length) return;
  state.chatImage = await readAsDataUrl(files[0]);
  $("chat-preview").src = state.chatImage.url;
  $("chat-preview").hidden = false;
});
imageInput($("embed-drop"), $("embed-images"), async (files) => {
  state.embedImages = await Promise.all(files.map(readAsDataUrl));
  $("embed-stats").textContent = `${state.embedImages.length} images ready`;
});
for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
$("chat-send").addEventListener("click", ask);
$("chat-stop").addEventListener("click", () => state.abort?.abort());
$("embed-rank").addEventListener("click", rank);
$("api-key").value = sessionStorage.getItem("mmserve-api-key") || "";
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("mmserve-api-key", $("api-key").value);
  loadModels();
});
loadModels();
