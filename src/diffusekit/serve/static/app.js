// diffusekit studio: plain JS over the native API (/api/...). Nothing is fetched from elsewhere.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { models: [], job: null, lastSeed: null, selected: null, hasInit: false, hasMask: false, painting: false };

function headers(extra) {
  const key = localStorage.getItem("diffusekit-api-key");
  return Object.assign(key ? { Authorization: "Bearer " + key } : {}, extra || {});
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({}, options, { headers: headers((options || {}).headers) }));
  if (response.status === 401) { $("key-box").hidden = false; }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    const retry = response.headers.get("Retry-After");
    throw new Error(message + (retry ? " (retry in " + retry + " s)" : ""));
  }
  return response;
}

async function blobUrl(path) { return URL.createObjectURL(await (await api(path)).blob()); }

function setStatus(text, isError) { $("status").textContent = text; $("status").className = isError ? "error" : "muted"; }

function fillSelect(select, values, chosen) {
  select.replaceChildren(...values.map((v) => { const o = document.createElement("option"); o.value = o.textContent = v; return o; }));
  if (chosen !== undefined) select.value = String(chosen);
}

function currentModel() { return state.models.find((m) => m.name === $("model").value) || state.models[0]; }

function applyModel() {
  const m = currentModel();
  if (!m) return;
  fillSelect($("sampler"), m.samplers, m.defaults.sampler);
  fillSelect($("schedule"), m.schedules, m.defaults.schedule);
  fillSelect($("size"), m.sizes, m.size);
  $("steps").value = m.defaults.steps;
  $("guidance").value = m.defaults.guidance;
  $("prompt").disabled = $("negative").disabled = $("attention").disabled = !m.text;
  showControlPanel(m);
  $("model-info").textContent = `${m.size} px, ${m.latent ? "latent" : "pixel"} model, hash ${m.fingerprint}`;
  scheduleSoon();
}

async function loadModels() {
  const data = await (await api("/api/models")).json();
  state.models = data.models;
  state.limits = data.limits;
  fillSelect($("model"), data.models.map((m) => m.name));
  $("n").max = data.limits.max_n;
  $("steps").max = data.limits.max_steps;
  $("guidance").max = data.limits.max_guidance;
  applyModel();
}

// ------------------------------------------------------------------ the init image and the brush

function loadInit(src) {
  const image = new Image();
  image.onload = () => {
    for (const c of [$("init-canvas"), $("mask-canvas")]) { c.width = image.naturalWidth; c.height = image.naturalHeight; }
    $("init-canvas").getContext("2d").drawImage(image, 0, 0);
    $("mask-canvas").getContext("2d").clearRect(0, 0, image.naturalWidth, image.naturalHeight);
    $("brush").max = Math.max(1, Math.round(image.naturalWidth / 2));
    $("brush").value = Math.max(1, Math.round(image.naturalWidth / 10));
    state.hasInit = true; state.hasMask = false;
    $("canvas-box").hidden = $("edit-controls").hidden = false;
  };
  image.src = src;
}

function stroke(canvas, event, last, colour, width) {  // a round brush stroke from `last` (null: a dot) to the pointer, in canvas pixels
  const box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * canvas.width / box.width, y = (event.clientY - box.top) * canvas.height / box.height;
  const g = canvas.getContext("2d"), from = last || { x, y };
  g.strokeStyle = colour; g.lineWidth = width; g.lineCap = g.lineJoin = "round";
  g.beginPath(); g.moveTo(from.x, from.y); g.lineTo(x + 0.01, y); g.stroke();
  return { x, y };
}

function paint(event, first) {  // the inpainting mask's brush
  state.last = stroke($("mask-canvas"), event, first ? null : state.last, "#00d5ff", Number($("brush").value));
  state.hasMask = true;
}

function canvasData(canvas, background) {
  const out = document.createElement("canvas");
  out.width = canvas.width; out.height = canvas.height;
  const g = out.getContext("2d");
  if (background) { g.fillStyle = background; g.fillRect(0, 0, out.width, out.height); }
  g.drawImage(canvas, 0, 0);
  if (background) {  // the strokes (any colour) become white: the mask the API takes
    const pixels = g.getImageData(0, 0, out.width, out.height);
    for (let i = 0; i < pixels.data.length; i += 4) {
      const on = pixels.data[i] > 16 || pixels.data[i + 1] > 16 || pixels.data[i + 2] > 16;
      pixels.data[i] = pixels.data[i + 1] = pixels.data[i + 2] = on ? 255 : 0;
    }
    g.putImageData(pixels, 0, 0);
  }
  return out.toDataURL("image/png");
}

// ------------------------------------------------------------------ jobs

function requestBody() {
  const seedMode = $("seed-mode").value;
  const body = {
    model: $("model").value, prompt: $("prompt").value, negative_prompt: $("negative").value, sampler: $("sampler").value,
    schedule: $("schedule").value, steps: Number($("steps").value), guidance: Number($("guidance").value), size: Number($("size").value),
    n: Number($("n").value), seed: seedMode === "random" ? null : Number($("seed").value), animate: $("animate").checked,
    attention: $("attention").checked,
  };
  if (!currentModel().text) { body.prompt = ""; body.negative_prompt = ""; body.attention = false; }
  const controls = controlEntry();
  if (controls) body.control = controls;
  if (state.hasInit) {
    body.image = canvasData($("init-canvas"));
    body.strength = Number($("strength").value);
    if (state.hasMask) { body.mask = canvasData($("mask-canvas"), "#000"); body.mask_blur = Number($("mask-blur").value); }
  }
  return body;
}

async function generate(event) {
  event.preventDefault();
  if (state.job) return;
  $("generate").disabled = true;
  $("animation").hidden = true;
  setStatus("submitting");
  try {
    const job = await (await api("/api/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestBody()) })).json();
    state.job = job.id;
    $("cancel").disabled = false;
    setStatus(job.position ? `queued (${job.position} ahead)` : "queued");
    await follow(job.id);
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    state.job = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

async function follow(jobId) {
  const response = await api(`/api/jobs/${jobId}/events`);
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const line = block.split("\n").find((l) => l.startsWith("data: "));
      if (line && await onEvent(JSON.parse(line.slice(6)))) { reader.cancel(); return; }
    }
  }
}

async function onEvent(event) {
  showPreviews(event);
  if (event.event === "progress") {
    $("progress").value = event.step / event.steps;
    setStatus(`step ${event.step} of ${event.steps}`);
  } else if (event.event === "running") {
    setStatus("running");
  } else if (event.event === "done") {
    const job = event.job;
    $("progress").value = 1;
    setStatus(`done: ${job.images.length} image(s), seed ${job.seed}` + (job.notes && job.notes.length ? ` (${job.notes.join("; ")})` : ""));
    state.lastSeed = job.seed;
    keepAttention(job);
    for (const image of job.images) await addToGallery(image, true);
    if (job.images.length) select(job.images[0]);
    if (job.animation) { $("animation").src = await blobUrl(job.animation); $("animation").hidden = false; }
    await loadStatus();  // a full disk or an unwritable outputs folder shows up with the first image it could not save
    return true;
  } else if (event.event === "failed") {
    setStatus(event.job.error ? event.job.error.message : "failed", true);
    return true;
  } else if (event.event === "cancelled") {
    setStatus("cancelled");
    return true;
  }
  return false;
}

// ------------------------------------------------------------------ the gallery (pages of the server's, newest first)

const gallery = new Map();
const PAGE = 60;

function insertFigure(image, src, newest) {
  if (gallery.has(image.id)) return;
  const figure = document.createElement("figure");
  figure.className = "item";
  figure.dataset.imageId = image.id;
  const img = document.createElement("img");
  img.alt = image.parameters.split("\n")[0] || "image";
  img.src = src;
  const caption = document.createElement("figcaption");
  caption.textContent = `${img.alt} · seed ${image.seed}#${image.index}`;
  const remove = document.createElement("button");
  remove.type = "button"; remove.className = "delete"; remove.textContent = "×";
  remove.title = "delete (moved to the outputs folder's trash/)"; remove.setAttribute("aria-label", "delete");
  remove.addEventListener("click", (event) => { event.stopPropagation(); deleteImage(image); });
  figure.append(img, caption, remove);
  figure.addEventListener("click", () => select(image));
  gallery.set(image.id, { image, figure, src });
  const items = $("gallery-items");
  if (newest) items.prepend(figure); else items.append(figure);
}

async function addToGallery(image, newest) {
  if (!gallery.has(image.id)) insertFigure(image, await blobUrl(image.url), newest);
}

async function loadPage() {  // the next page of older images: the server's offset is how many the page shows already
  const data = await (await api(`/api/images?offset=${gallery.size}&limit=${PAGE}`)).json();
  const fresh = data.images.filter((image) => !gallery.has(image.id));
  const sources = await Promise.all(fresh.map((image) => blobUrl(image.url).catch(() => null)));
  fresh.forEach((image, k) => { if (sources[k]) insertFigure(image, sources[k], false); });
  $("gallery-more").hidden = gallery.size >= data.total || data.images.length === 0;
}

async function deleteImage(image) {
  try {
    const answer = await (await api(`/api/images/${image.id}`, { method: "DELETE" })).json();
    const entry = gallery.get(image.id);
    if (entry) { entry.figure.remove(); gallery.delete(image.id); }
    if (state.selected && state.selected.id === image.id) { state.selected = null; $("details").hidden = true; }
    setStatus(answer.trash ? `moved to ${answer.trash} in the outputs folder` : "deleted");
    await loadStatus();
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function loadStatus() {  // where images go; a notice when they cannot be saved there
  const status = await (await api("/api/status")).json();
  $("notice").textContent = status.notice || "";
  $("notice").hidden = !status.notice;
  $("gallery-info").textContent = `${status.images} image(s), ` + (status.saving ? `saved in ${status.outputs}` : "kept in memory only");
}

function select(image) {
  state.selected = image;
  for (const { figure } of gallery.values()) figure.classList.toggle("selected", figure.dataset.imageId === image.id);
  const entry = gallery.get(image.id);
  $("details").hidden = false;
  $("details-text").textContent = image.parameters;
  $("download").href = entry ? entry.src : image.url;
  $("download").download = `diffusekit-${image.id}.png`;
  if (entry) showImage(entry.src, image.id);
}

function useSettings() {
  const image = state.selected;
  if (!image) return;
  const lines = image.parameters.split("\n"), fields = {};
  for (const part of lines[lines.length - 1].split(", ")) { const i = part.indexOf(": "); if (i > 0) fields[part.slice(0, i)] = part.slice(i + 2); }
  const negative = lines.find((l) => l.startsWith("Negative prompt: "));
  $("prompt").value = lines.filter((l, i) => i < lines.length - 1 && !l.startsWith("Negative prompt: ")).join("\n");
  $("negative").value = negative ? negative.slice(17) : "";
  if (fields.Sampler) $("sampler").value = fields.Sampler;
  if (fields["Schedule type"]) $("schedule").value = fields["Schedule type"];
  if (fields.Steps) $("steps").value = fields.Steps;
  if (fields["CFG scale"]) $("guidance").value = fields["CFG scale"];
  $("seed").value = image.seed; $("seed-mode").value = "fixed";
}

async function init() {
  $("api-key").value = localStorage.getItem("diffusekit-api-key") || "";
  $("api-key").addEventListener("change", () => { localStorage.setItem("diffusekit-api-key", $("api-key").value); start(); });
  $("model").addEventListener("change", applyModel);
  for (const id of ["steps", "schedule", "size"]) $(id).addEventListener("input", scheduleSoon);
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => state.job && api(`/api/jobs/${state.job}`, { method: "DELETE" }).catch((e) => setStatus(e.message, true)));
  $("reuse-seed").addEventListener("click", () => { if (state.lastSeed !== null) { $("seed").value = state.lastSeed; $("seed-mode").value = "fixed"; } });
  $("strength").addEventListener("input", () => { $("strength-out").textContent = $("strength").value; });
  $("init-file").addEventListener("change", () => { const f = $("init-file").files[0]; if (f) loadInit(URL.createObjectURL(f)); });
  $("clear-init").addEventListener("click", () => { state.hasInit = state.hasMask = false; $("canvas-box").hidden = $("edit-controls").hidden = true; $("init-file").value = ""; });
  $("clear-mask").addEventListener("click", () => { const c = $("mask-canvas"); c.getContext("2d").clearRect(0, 0, c.width, c.height); state.hasMask = false; });
  $("use-init").addEventListener("click", () => { const e = state.selected && gallery.get(state.selected.id); if (e) loadInit(e.src); });
  $("use-settings").addEventListener("click", useSettings);
  $("gallery-more").addEventListener("click", () => loadPage().catch((e) => setStatus(e.message, true)));
  initControl();
  const mask = $("mask-canvas");
  mask.addEventListener("pointerdown", (e) => { state.painting = true; mask.setPointerCapture(e.pointerId); paint(e, true); });
  mask.addEventListener("pointermove", (e) => { if (state.painting) paint(e); });
  mask.addEventListener("pointerup", () => { state.painting = false; });
  await start();
}

async function start() {
  try {
    await loadModels();
    await loadStatus();
    await loadPage();
    setStatus("ready");
  } catch (err) {
    setStatus(err.message, true);
  }
}

init();
