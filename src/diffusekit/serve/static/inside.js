// diffusekit studio, the "inside" view: the served model's noise schedule with the sampler's steps marked (an inline
// SVG drawn from GET /api/models/{name}/schedule), the noisy x_t beside the x0-hat preview, and each prompt token's
// attention map laid over the image. Plain functions that app.js calls; nothing is fetched from elsewhere.
"use strict";

const CHART = { width: 360, height: 190, left: 34, right: 38, top: 10, bottom: 24 };
const inside = { timer: null, asked: 0, attention: new Map() };  // attention: image id -> {tokens, maps} of that image

function svgNode(name, attributes, text) {
  const node = document.createElementNS($("schedule-chart").namespaceURI, name);  // the inline <svg>'s own namespace
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawSchedule(data) {  // alpha-bar (left axis, 0..1) and log-SNR (right axis) against t; a dot where the network is called
  const c = CHART, chart = $("schedule-chart"), plotW = c.width - c.left - c.right, plotH = c.height - c.top - c.bottom;
  const snrs = data.log_snr.concat(data.marks.log_snr), lo = Math.floor(Math.min(...snrs)), hi = Math.ceil(Math.max(...snrs));
  const x = (t) => c.left + (t / data.t_max) * plotW;
  const yBar = (a) => c.top + (1 - a) * plotH, ySnr = (s) => c.top + ((hi - s) / (hi - lo || 1)) * plotH;
  const line = (ys, values, cls) => svgNode("polyline", { class: cls, points: data.t.map((t, i) => `${x(t).toFixed(1)},${ys(values[i]).toFixed(1)}`).join(" ") });
  const nodes = [svgNode("rect", { class: "frame", x: c.left, y: c.top, width: plotW, height: plotH })];
  data.marks.t.forEach((t) => nodes.push(svgNode("line", { class: "step", x1: x(t), x2: x(t), y1: c.top, y2: c.top + plotH })));
  nodes.push(line(yBar, data.alpha_bar, "alpha-bar"), line(ySnr, data.log_snr, "log-snr"));
  data.marks.t.forEach((t, i) => {
    nodes.push(svgNode("circle", { class: "alpha-bar", cx: x(t), cy: yBar(data.marks.alpha_bar[i]), r: 2.5 }, undefined));
    nodes.push(svgNode("circle", { class: "log-snr", cx: x(t), cy: ySnr(data.marks.log_snr[i]), r: 2.5 }));
  });
  const label = (text, attrs) => nodes.push(svgNode("text", attrs, text));
  label("1", { x: c.left - 4, y: c.top + 8, "text-anchor": "end", class: "alpha-bar" });
  label("0", { x: c.left - 4, y: c.top + plotH, "text-anchor": "end", class: "alpha-bar" });
  label(String(hi), { x: c.width - c.right + 8, y: c.top + 8, class: "log-snr" });
  label(String(lo), { x: c.width - c.right + 8, y: c.top + plotH, class: "log-snr" });
  label(data.process === "flow" ? "t: 0 (data) → 1 (noise)" : `timestep t: 0 → ${data.t_max}`, { x: c.left + plotW / 2, y: c.height - 6, "text-anchor": "middle" });
  chart.replaceChildren(...nodes);
  const sigmas = data.sigmas.slice(0, -1);
  $("schedule-info").textContent = `${data.steps} ${data.schedule} steps: σ from ${sigmas[0].toPrecision(3)} down to ${sigmas[sigmas.length - 1].toPrecision(3)}, then 0`;
}

function scheduleSoon() {  // redraw after the settings stop changing (steps typed digit by digit)
  clearTimeout(inside.timer);
  inside.timer = setTimeout(loadSchedule, 150);
}

async function loadSchedule() {
  const model = $("model").value;
  if (!model) return;
  const asked = ++inside.asked, query = new URLSearchParams({ steps: $("steps").value, schedule: $("schedule").value, size: $("size").value });
  try {
    const data = await (await api(`/api/models/${encodeURIComponent(model)}/schedule?${query}`)).json();
    if (asked === inside.asked) drawSchedule(data);
  } catch (err) {
    if (asked === inside.asked) $("schedule-info").textContent = err.message;
  }
}

// ------------------------------------------------------------------ the live previews

function showPreviews(event) {  // a progress event's x0-hat and x_t, side by side
  if (event.preview) {
    showTokens(null);  // a new sampling: the last image's words and map go
    $("preview").src = event.preview; $("preview-box").hidden = false; $("preview-label").textContent = "x0-hat (predicted)";
  }
  if (event.noisy) { $("noisy").src = event.noisy; $("noisy-box").hidden = false; $("pictures").classList.add("sampling"); }
}

function showImage(src, imageId) {  // a finished image in the preview's place, with its prompt's tokens when it has maps
  $("preview").src = src; $("preview-box").hidden = false; $("noisy-box").hidden = true; $("preview-label").textContent = "image";
  $("pictures").classList.remove("sampling");
  showTokens(imageId);
}

// ------------------------------------------------------------------ attention maps: a word of the prompt over the image

function keepAttention(job) {
  if (!job.attention) return;
  job.images.forEach((image, k) => inside.attention.set(image.id, { tokens: job.attention.tokens, maps: job.attention.maps[k] }));
}

function showTokens(imageId) {  // the selected image's prompt tokens as buttons; a click lays that token's map over it
  const known = inside.attention.get(imageId), box = $("tokens");
  $("attention-overlay").hidden = true;
  $("preview-box").classList.remove("attending");
  box.hidden = !known;
  if (!known) { box.replaceChildren(); return; }
  const buttons = known.tokens.map((token, k) => {
    const button = document.createElement("button");
    button.type = "button"; button.className = "token"; button.textContent = token.replace(/<\/w>$/, "");
    button.addEventListener("click", () => {
      const on = !button.classList.contains("on");
      for (const other of box.querySelectorAll(".token")) other.classList.remove("on");
      button.classList.toggle("on", on);
      $("attention-overlay").src = known.maps[k];
      $("attention-overlay").hidden = !on;
      $("preview-box").classList.toggle("attending", on);  // the image grayed below the map, as in --attention-maps
    });
    return button;
  });
  box.replaceChildren(Object.assign(document.createElement("span"), { className: "muted", textContent: "attention of: " }), ...buttons);
}
