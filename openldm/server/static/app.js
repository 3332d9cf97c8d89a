// The openldm page: a form that queues jobs (POST /jobs), the queue with cancel buttons, a live
// preview from the job's server-sent events, and a gallery of results with their parameters.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("openldm-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("openldm-key", keyInput.value); start(); });

function headers(json) {
  const h = {};
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = Array.isArray(body.detail) ? body.detail.map((d) => `${d.loc.at(-1)}: ${d.msg}`).join("; ") : body.detail;
    } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response.status === 204 ? null : response.json();
}

async function imageUrl(path) {
  const response = await fetch(path, { headers: headers(false) });
  return URL.createObjectURL(await response.blob());
}

// --- the form -------------------------------------------------------------------------------------

function mode() { return document.querySelector("input[name=mode]:checked").value; }
document.querySelectorAll("input[name=mode]").forEach((input) =>
  input.addEventListener("change", () => {
    $("image-inputs").hidden = mode() === "txt2img";
    $("mask-canvas").hidden = $("mask-tools").hidden = mode() !== "inpaint";
  }));

function addToPrompt(text) { $("prompt").value = ($("prompt").value.trim() + " " + text).trim(); }
$("lora").addEventListener("change", (e) => { if (e.target.value) addToPrompt(`<lora:${e.target.value}:0.8>`); e.target.value = ""; });
$("embedding").addEventListener("change", (e) => { if (e.target.value) addToPrompt(e.target.value); e.target.value = ""; });

const imageCanvas = $("image-canvas"), maskCanvas = $("mask-canvas");
const mask = maskCanvas.getContext("2d");
let initImage = null;
$("init").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (!file) return;
  const image = new Image();
  image.onload = () => {
    initImage = image;
    for (const canvas of [imageCanvas, maskCanvas]) { canvas.width = image.width; canvas.height = image.height; }
    imageCanvas.getContext("2d").drawImage(image, 0, 0);
    $("width").value = image.width - (image.width % 8);
    $("height").value = image.height - (image.height % 8);
  };
  image.src = URL.createObjectURL(file);
});
let painting = false;
function paint(e) {
  if (!painting) return;
  const box = maskCanvas.getBoundingClientRect();
  const x = (e.clientX - box.left) * maskCanvas.width / box.width, y = (e.clientY - box.top) * maskCanvas.height / box.height;
  mask.fillStyle = "rgba(255,255,255,0.8)";
  mask.beginPath(); mask.arc(x, y, Number($("brush").value) / 2, 0, 2 * Math.PI); mask.fill();
}
maskCanvas.addEventListener("pointerdown", (e) => { painting = true; paint(e); });
maskCanvas.addEventListener("pointermove", paint);
window.addEventListener("pointerup", () => { painting = false; });
$("clear-mask").addEventListener("click", () => mask.clearRect(0, 0, maskCanvas.width, maskCanvas.height));

function maskPng() {
  // White where painted, black elsewhere: the web UI's mask.
  const out = document.createElement("canvas");
  out.width = maskCanvas.width; out.height = maskCanvas.height;
  const context = out.getContext("2d");
  context.fillStyle = "black"; context.fillRect(0, 0, out.width, out.height);
  const painted = mask.getImageData(0, 0, out.width, out.height);
  const pixels = context.getImageData(0, 0, out.width, out.height);
  for (let i = 3; i < painted.data.length; i += 4) if (painted.data[i] > 0) pixels.data.fill(255, i - 3, i);
  context.putImageData(pixels, 0, 0);
  return out.toDataURL("image/png");
}

$("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("error").textContent = "";
  const body = {
    type: mode() === "txt2img" ? "txt2img" : "img2img",
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    steps: Number($("steps").value), cfg_scale: Number($("cfg").value), seed: Number($("seed").value),
    width: Number($("width").value), height: Number($("height").value), batch_size: Number($("batch").value),
  };
  if (body.type === "img2img") {
    if (!initImage) { $("error").textContent = "choose an init image"; return; }
    body.init_images = [imageCanvas.toDataURL("image/png")];
    body.denoising_strength = Number($("strength").value);
    if (mode() === "inpaint") body.mask = maskPng();
  }
  try {
    const job = await api("/jobs", { method: "POST", body: JSON.stringify(body) });
    follow(job.id);
    refreshQueue();
  } catch (error) { $("error").textContent = error.message; }
});

// --- the queue, the preview and the gallery ---------------------------------------------------------

async function refreshQueue() {
  const jobs = await api("/jobs?state=queued,running");
  const list = $("queue");
  list.replaceChildren();
  for (const job of jobs) {
    const item = document.createElement("li");
    item.textContent = `${job.kind} ${job.id.slice(0, 8)} ${job.state} ${Math.round(job.progress * 100)}% `;
    const cancel = document.createElement("button");
    cancel.textContent = "Cancel"; cancel.className = "cancel";
    cancel.addEventListener("click", async () => { await api(`/jobs/${job.id}`, { method: "DELETE" }); refreshQueue(); });
    item.append(cancel);
    list.append(item);
  }
}

async function follow(id) {
  // Server-sent events read through fetch, so that the API key goes in a header.
  const response = await fetch(`/jobs/${id}/events`, { headers: headers(false) });
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const message = buffer.slice(0, end); buffer = buffer.slice(end + 2);
      const data = JSON.parse(message.split("\n").find((l) => l.startsWith("data: ")).slice(6));
      $("progress").value = data.progress;
      if (data.preview) $("preview").src = "data:image/png;base64," + data.preview;
      if (["done", "failed", "cancelled"].includes(data.state)) { show(data); refreshQueue(); }
    }
  }
}

async function show(job) {
  if (job.state !== "done") {
    if (job.state === "failed") $("error").textContent = job.error;
    return;
  }
  const texts = (job.info && job.info.infotexts) || [];
  for (const [n, path] of job.images.entries()) {
    const card = document.createElement("div");
    card.className = "result";
    const image = document.createElement("img");
    image.src = await imageUrl(path);
    const parameters = document.createElement("pre");
    parameters.className = "parameters"; parameters.textContent = texts[n] || "";
    card.append(image, parameters);
    $("gallery").prepend(card);
  }
}

async function start() {
  try {
    const [samplers, loras, embeddings, options] = await Promise.all([
      api("/sdapi/v1/samplers"), api("/sdapi/v1/loras"), api("/sdapi/v1/embeddings"), api("/sdapi/v1/options"),
    ]);
    $("sampler").replaceChildren(...samplers.map((s) => new Option(s.name, s.name, s.name === "Euler a", s.name === "Euler a")));
    $("lora").replaceChildren(new Option("add a LoRA…", ""), ...loras.map((l) => new Option(l.name, l.name)));
    $("embedding").replaceChildren(new Option("add an embedding…", ""), ...Object.keys(embeddings.loaded).map((w) => new Option(w, w)));
    $("model").textContent = options.sd_model_checkpoint;
    const recent = await api("/jobs?state=done&limit=12");
    for (const job of recent.reverse()) await show(job);
    refreshQueue();
    $("error").textContent = "";
  } catch (error) { $("error").textContent = error.message; }
}
start();
setInterval(refreshQueue, 2000);
