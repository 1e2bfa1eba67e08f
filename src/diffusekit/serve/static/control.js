// diffusekit studio, the control panel: a ControlNet's control image, uploaded or drawn with the brush on a blank
// canvas (white strokes on black, as scribble ControlNets expect), the annotator's output seen before generating
// (POST /api/annotate), and the scale / start / end a job's "control" entry sends. Shown only for a model with a
// ControlNet. Plain functions that app.js calls; nothing is fetched from elsewhere.
"use strict";

const control = { active: false, drawing: false, last: null, asked: 0 };

function showControlPanel(model) {  // on a model change: the panel and its ControlNets, or nothing
  const names = (model && model.controlnets) || [];
  $("control-panel").hidden = names.length === 0;
  fillSelect($("control-net"), names);
  if (!names.length) clearControl();
}

function controlCanvas(width, height) {  // the canvas at this size, black
  const canvas = $("control-canvas");
  canvas.width = width; canvas.height = height;
  const g = canvas.getContext("2d");
  g.fillStyle = "#000"; g.fillRect(0, 0, width, height);
  $("control-brush").max = Math.max(1, Math.round(width / 4));
  $("control-brush").value = Math.max(1, Math.round(width / 12));
  control.active = true;
  $("control-box").hidden = false;
  $("control-preview").hidden = true;
  return g;
}

function blankControl() {  // a blank canvas at the output size: what the ControlNet sees, pixel for pixel
  const size = Number($("size").value) || currentModel().size;
  controlCanvas(size, size);
  $("control-annotator").value = "none";  // a scribble drawn here is already white lines on black
}

function loadControl(src) {  // an uploaded picture: the annotator (canny, scribble) makes the control image of it
  const image = new Image();
  image.onload = () => {
    controlCanvas(image.naturalWidth, image.naturalHeight).drawImage(image, 0, 0);
    if ($("control-annotator").value === "none") $("control-annotator").value = "canny";
    previewControl();
  };
  image.src = src;
}

function clearControl() {
  control.active = false;
  $("control-box").hidden = true;
  $("control-file").value = "";
}

function drawControl(event, first) {  // a white round stroke: stroke() in app.js, the brush of the mask too
  control.last = stroke($("control-canvas"), event, first ? null : control.last, "#fff", Number($("control-brush").value));
}

async function previewControl() {  // what the job's ControlNet will see: the image at the output size, annotated
  if (!control.active) return;
  const asked = ++control.asked;
  const body = { image: $("control-canvas").toDataURL("image/png"), annotator: $("control-annotator").value, size: Number($("size").value) };
  try {
    const png = await (await api("/api/annotate", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })).blob();
    if (asked !== control.asked) return;
    $("control-preview").src = URL.createObjectURL(png);
    $("control-preview").hidden = false;
  } catch (err) {
    setStatus(err.message, true);
  }
}

function controlEntry() {  // the job's "control" list: one entry, or none without a control image
  if (!control.active || $("control-panel").hidden) return null;
  return [{ image: $("control-canvas").toDataURL("image/png"), controlnet: $("control-net").value, annotator: $("control-annotator").value,
    scale: Number($("control-scale").value), start: Number($("control-start").value), end: Number($("control-end").value) }];
}

function initControl() {
  $("control-blank").addEventListener("click", blankControl);
  $("control-clear").addEventListener("click", clearControl);
  $("control-preview-button").addEventListener("click", previewControl);
  $("control-annotator").addEventListener("change", previewControl);
  $("control-file").addEventListener("change", () => { const f = $("control-file").files[0]; if (f) loadControl(URL.createObjectURL(f)); });
  const canvas = $("control-canvas");
  canvas.addEventListener("pointerdown", (e) => { control.drawing = true; canvas.setPointerCapture(e.pointerId); drawControl(e, true); });
  canvas.addEventListener("pointermove", (e) => { if (control.drawing) drawControl(e); });
  canvas.addEventListener("pointerup", () => { control.drawing = false; previewControl(); });
}
