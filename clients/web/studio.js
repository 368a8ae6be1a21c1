// styleblend studio: the page side of the public API. Every frame on the WebSocket is a
// styleblend.v1.SessionRequest (to the server) or SessionResponse (from it) in protobuf's
// canonical JSON; services/gateway/web.py bridges it to the gateway's gRPC Session.

const MASK_SIDE = 256; // longest side of a painted map; the gateway resizes maps to its canvas
const OVERLAY_ALPHA = 0.45;
const SEND_EVERY_MS = 150; // a dragged slider sends at most this often (the server coalesces too)
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#0fb5c9", "#f032e6", "#8a9a00"];
// google.rpc.Code numbering, as UpdateRejected.code carries it.
const CODES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
  "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
];

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "styleblend-token"; // sessionStorage: kept for this tab only

const state = {
  sources: [], // {key, name, blob, url, width, height, style, content, color, mask, painted}
  nextKey: 1,
  brush: "eraser", // a source's key, or "eraser"
  maskWidth: MASK_SIDE,
  maskHeight: MASK_SIDE,
  run: null, // {socket, nextUpdateId, lastSentId, pending:Set<key>, timer, ended, gotResult}
  showing: "content", // what the stage image shows: "content", "preview" or "result"
  resultUrl: null,
  maxSources: PALETTE.length, // GetInfo's limit once it answers
  token: sessionStorage.getItem(TOKEN_KEY) || "", // the gateway's, when it asks for one
};

// --- talking to the server -------------------------------------------------------------------

class ServerError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

function withToken(options = {}) {
  if (!state.token) return options;
  return { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${state.token}` } };
}

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, withToken(options));
  } catch (error) {
    throw new ServerError("UNAVAILABLE", `the studio server cannot be reached (${error.message})`);
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok || body.error) {
    const error = body.error || { code: `HTTP ${response.status}`, message: response.statusText };
    if (error.code === "UNAUTHENTICATED") askForToken(error.message);
    throw new ServerError(error.code, error.message);
  }
  return body;
}

function uploadImage(blob) {
  return api("api/upload", { method: "POST", body: blob });
}

function socketUrl() {
  const url = new URL("ws/session", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url;
}

// The gateway may ask for a token: the page asks the person once, keeps it for this tab, and
// sends it as a bearer header on HTTP calls and as the first frame of each session socket.
function askForToken(reason) {
  $("token-reason").textContent = state.token ? `The token was not accepted: ${reason}` : reason;
  $("token-form").hidden = false;
  $("token").focus();
}

function tokenEntered(event) {
  event.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $("token-form").hidden = true;
  clearMessage();
  loadInfo();
}

// --- messages to the person ------------------------------------------------------------------

function showMessage(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = kind === "error" ? "message" : "message note";
  box.dataset.kind = kind;
  box.hidden = false;
}

function clearMessage() {
  $("message").hidden = true;
  $("message").textContent = "";
}

function showError(error, what) {
  const code = error.code ? ` (${error.code})` : "";
  showMessage(`${what}: ${error.message}${code}`);
}

// --- info and samples ------------------------------------------------------------------------

// The studio is served as soon as `styleblend up` starts, before the graph answers, and a
// gateway may restart: while it is UNAVAILABLE the page asks again, less often each time.
const INFO_RETRY_MS = [1000, 2000, 4000, 8000];
let infoRetries = 0;
let infoTimer = null;

async function loadInfo() {
  clearTimeout(infoTimer);
  try {
    const info = await api("api/info");
    const providers = (info.executionProviders || []).join(", ");
    $("model-info").textContent =
      `model ${info.model} · features on ${providers || "?"} · reconstruction on ` +
      `${info.reconstructionDevice || "?"} · v${info.version}`;
    if (infoRetries > 0) clearMessage(); // the "not answering yet" note
    infoRetries = 0;
    applyLimits(info);
    offerFastModels(info.fastModels || []);
    offerUniversal(info.universal);
  } catch (error) {
    $("model-info").textContent = "The gateway is not answering.";
    if (error.code !== "UNAVAILABLE") {
      showError(error, "Could not reach the gateway");
      return;
    }
    const wait = INFO_RETRY_MS[Math.min(infoRetries, INFO_RETRY_MS.length - 1)];
    infoRetries += 1;
    showMessage(`The gateway is not answering yet (${error.message}); trying again in ` +
                `${wait / 1000} s.`, "note");
    infoTimer = setTimeout(loadInfo, wait);
  }
}

function applyLimits(info) {
  const defaults = info.defaults || {};
  const limits = info.limits || {};
  if (defaults.maxSidePx) $("size").value = defaults.maxSidePx;
  if (defaults.iterations) $("iterations").value = defaults.iterations;
  // Only hints: the server checks every request, and its refusal is shown in words.
  if (limits.maxSidePx) $("size").max = limits.maxSidePx;
  if (limits.maxIterations) $("iterations").max = limits.maxIterations;
  if (limits.maxSources) state.maxSources = Math.min(limits.maxSources, PALETTE.length);
}

const ONE_PASS = [[false, "instant"], [true, "instant, then refined"]];

function offerFastModels(models) {
  // Each trained network adds two methods: its image alone, or its image refined.
  for (const model of models) {
    const styles = (model.styles || []).filter((s) => s.sha256).map((s) => s.name).join(", ");
    for (const [refine, words] of ONE_PASS) {
      const option = document.createElement("option");
      option.value = JSON.stringify({ fast: { model: model.name, refine } });
      option.textContent = `Fast network ${model.name} (${styles}): ${words}`;
      $("mode").append(option);
    }
  }
}

function offerUniversal(universal) {
  // Any painting, no training: the universal image first, then refined, is the default.
  if (!universal || !(universal.layers || []).length) return;
  for (const [refine, words] of ONE_PASS) {
    const option = document.createElement("option");
    option.value = JSON.stringify({ universal: { refine } });
    option.textContent = `Universal (any images): ${words}`;
    $("mode").append(option);
    if (refine) option.selected = true;
  }
  modeChanged();
}

function onePassOptions() {
  // {fast: {...}} or {universal: {...}}, with the strength slider's value; null: iterative.
  const mode = $("mode").value;
  if (mode === "iterative") return null;
  const chosen = JSON.parse(mode);
  const [kind] = Object.keys(chosen);
  return { [kind]: { ...chosen[kind], strength: Number($("strength").value) } };
}

function modeChanged() {
  $("strength").disabled = onePassOptions() === null;
}

function strengthMoved() {
  $("strength-value").textContent = Number($("strength").value).toFixed(2);
  const strength = Number($("strength").value);
  if (state.run && state.run.fast) sendUpdate({ fastStrength: strength });
  if (state.run && state.run.universal) sendUpdate({ universalStrength: strength });
}

async function loadSamples() {
  try {
    const samples = await api("api/samples");
    for (const kind of ["content", "style"]) {
      $(`samples-${kind}`).replaceChildren(...samples[kind].map((s) => sampleButton(s, kind)));
    }
  } catch (error) {
    showError(error, "Could not list the sample images");
  }
}

function sampleButton(sample, kind) {
  const name = sample.name.replace(/\.[^.]+$/, "");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "sample";
  button.dataset.testid = `sample-${name}`;
  button.title = `Add ${name} as a ${kind} source`;
  const img = document.createElement("img");
  img.src = sample.url;
  img.alt = name;
  img.loading = "lazy";
  const label = document.createElement("span");
  label.textContent = name.replaceAll(/[_-]/g, " ");
  button.append(img, label);
  button.addEventListener("click", () => addSample(sample.url, name, kind));
  return button;
}

async function addSample(url, name, kind) {
  const blob = await (await fetch(url)).blob();
  const weights = kind === "content" ? { style: 0, content: 1 } : { style: 1, content: 0 };
  await addImage(name, blob, weights);
}

async function addOwnFile(event) {
  const file = event.target.files[0];
  event.target.value = "";
  if (file) await addImage(file.name.replace(/\.[^.]+$/, ""), file, { style: 1, content: 0 });
}

// --- sources ---------------------------------------------------------------------------------

async function addImage(name, blob, weights) {
  if (state.run) return;
  if (state.sources.length >= state.maxSources) {
    showMessage(`A blend here takes at most ${state.maxSources} sources.`);
    return;
  }
  let uploaded;
  try {
    uploaded = await uploadImage(blob); // the gateway checks the image now, not at Start
  } catch (error) {
    showError(error, `${name} was refused`);
    return;
  }
  clearMessage();
  state.sources.push({
    key: state.nextKey++,
    name,
    blob,
    url: URL.createObjectURL(blob),
    width: uploaded.widthPx,
    height: uploaded.heightPx,
    ...weights,
    color: freeColor(),
    mask: blankMask(),
    painted: false,
  });
  sourcesChanged();
}

function freeColor() {
  const used = new Set(state.sources.map((s) => s.color));
  return PALETTE.find((c) => !used.has(c)) || PALETTE[state.sources.length % PALETTE.length];
}

function removeSource(key) {
  const source = state.sources.find((s) => s.key === key);
  URL.revokeObjectURL(source.url);
  state.sources = state.sources.filter((s) => s.key !== key);
  if (state.brush === key) state.brush = "eraser";
  sourcesChanged();
}

function sourcesChanged() {
  state.showing = "content";
  renderSources();
  renderBrushes();
  refreshStage();
}

function renderSources() {
  $("sources-empty").hidden = state.sources.length > 0;
  $("sources").replaceChildren(...state.sources.map(sourceCard));
}

function renderPaintedLabels() {
  // In place, not a re-render: a slider keeps its focus while the person paints.
  state.sources.forEach((source, index) => {
    const label = document.querySelector(`[data-testid="source-${index}"] .painted`);
    if (label) label.textContent = source.painted ? "painted" : "";
  });
}

function sourceCard(source, index) {
  const card = document.createElement("li");
  card.className = "source";
  card.dataset.testid = `source-${index}`;
  card.style.setProperty("--swatch", source.color);
  card.innerHTML = `
    <img alt="">
    <div class="title"><span class="name"></span><span class="painted"></span>
      <button type="button" class="remove" title="Remove this source">✕</button></div>
    <div class="controls"></div>`;
  card.querySelector("img").src = source.url;
  card.querySelector(".name").textContent = source.name;
  card.querySelector(".painted").textContent = source.painted ? "painted" : "";
  const remove = card.querySelector(".remove");
  remove.dataset.testid = `remove-${index}`;
  remove.setAttribute("aria-label", `Remove ${source.name}`);
  remove.disabled = Boolean(state.run);
  remove.addEventListener("click", () => removeSource(source.key));
  card.querySelector(".controls").append(
    weightSlider(source, index, "style", "Style"),
    weightSlider(source, index, "content", "Content"),
  );
  return card;
}

function weightSlider(source, index, field, label) {
  const row = document.createElement("label");
  row.className = "weight";
  row.innerHTML = `<span></span><input type="range" min="0" max="1" step="0.05"><output></output>`;
  row.querySelector("span").textContent = label;
  const input = row.querySelector("input");
  const output = row.querySelector("output");
  input.value = source[field];
  input.dataset.testid = `${field}-${index}`;
  input.setAttribute("aria-label", `${label} weight of ${source.name}`);
  output.textContent = Number(source[field]).toFixed(2);
  input.addEventListener("input", () => {
    source[field] = Number(input.value);
    output.textContent = source[field].toFixed(2);
    weightsMoved(source);
  });
  input.addEventListener("change", () => flushWeights());
  return row;
}

function weightsMoved(source) {
  if (!state.run) {
    state.showing = "content"; // the canvas follows the content weights, as the gateway's does
    refreshStage();
    return;
  }
  state.run.pending.add(source.key);
  state.run.timer ??= setTimeout(flushWeights, SEND_EVERY_MS);
}

// --- the stage and its influence maps ---------------------------------------------------------

function canvasSource() {
  // As the gateway chooses: the largest content weight, the first of equals.
  return state.sources.reduce((best, s) => (best && best.content >= s.content ? best : s), null);
}

function refreshStage() {
  const source = canvasSource();
  $("stage-empty").hidden = Boolean(source);
  if (!source) {
    $("view").hidden = true;
  } else if (state.showing === "content") {
    setAspect(source.width, source.height);
    showImage(source.url, "content", 0);
  }
  drawOverlay();
}

function showImage(src, kind, iteration) {
  const view = $("view");
  view.src = src;
  view.hidden = false;
  view.dataset.kind = kind;
  view.dataset.iteration = String(iteration);
  view.alt = kind === "content" ? "The content photo" : `The blend at iteration ${iteration}`;
}

function setAspect(width, height) {
  $("stage").style.aspectRatio = `${width} / ${height}`;
  const scale = MASK_SIDE / Math.max(width, height);
  const maskWidth = Math.max(1, Math.round(width * scale));
  const maskHeight = Math.max(1, Math.round(height * scale));
  if (maskWidth === state.maskWidth && maskHeight === state.maskHeight) return;
  state.maskWidth = maskWidth;
  state.maskHeight = maskHeight;
  for (const source of state.sources) source.mask = resized(source.mask);
  $("paint").width = maskWidth;
  $("paint").height = maskHeight;
}

function blankMask() {
  const mask = document.createElement("canvas");
  mask.width = state.maskWidth;
  mask.height = state.maskHeight;
  return mask;
}

function resized(mask) {
  const copy = blankMask();
  copy.getContext("2d").drawImage(mask, 0, 0, copy.width, copy.height);
  return copy;
}

function drawOverlay() {
  const paint = $("paint");
  const context = paint.getContext("2d");
  context.clearRect(0, 0, paint.width, paint.height);
  const tint = document.createElement("canvas");
  tint.width = paint.width;
  tint.height = paint.height;
  const tinted = tint.getContext("2d");
  for (const source of state.sources.filter((s) => s.painted)) {
    tinted.globalCompositeOperation = "copy";
    tinted.drawImage(source.mask, 0, 0);
    tinted.globalCompositeOperation = "source-in"; // the strokes' shape in the source's colour
    tinted.fillStyle = source.color;
    tinted.fillRect(0, 0, tint.width, tint.height);
    context.globalAlpha = OVERLAY_ALPHA;
    context.drawImage(tint, 0, 0);
  }
  context.globalAlpha = 1;
}

function renderBrushes() {
  const group = $("brushes");
  group.querySelectorAll(".chip:not(.eraser)").forEach((chip) => chip.remove());
  state.sources.forEach((source, index) => {
    const chip = document.createElement("label");
    chip.className = "chip";
    chip.style.setProperty("--swatch", source.color);
    chip.innerHTML = `<input type="radio" name="brush"><span class="dot"></span><span></span>`;
    chip.lastElementChild.textContent = source.name;
    const radio = chip.querySelector("input");
    radio.value = String(source.key);
    radio.dataset.testid = `brush-${index}`;
    radio.setAttribute("aria-label", `Paint where ${source.name}'s style goes`);
    group.insertBefore(chip, group.querySelector(".eraser"));
  });
  if (state.brush === "eraser" && state.sources.some((s) => s.style > 0)) {
    state.brush = state.sources.find((s) => s.style > 0).key; // painting a style is the common case
  }
  for (const radio of group.querySelectorAll("input")) {
    radio.checked = radio.value === String(state.brush);
  }
}

const stroke = { active: false, x: 0, y: 0, touched: [] };

function maskPoint(event) {
  const rect = $("paint").getBoundingClientRect();
  return {
    x: ((event.clientX - rect.left) / rect.width) * state.maskWidth,
    y: ((event.clientY - rect.top) / rect.height) * state.maskHeight,
    scale: state.maskWidth / rect.width, // brush sizes are in screen pixels
  };
}

function strokeTargets() {
  if (state.brush === "eraser") return state.sources.filter((s) => s.painted);
  return state.sources.filter((s) => s.key === state.brush);
}

function paintSegment(from, to) {
  const width = Number($("brush-size").value) * to.scale;
  for (const source of stroke.touched) {
    const context = source.mask.getContext("2d");
    context.globalCompositeOperation = state.brush === "eraser" ? "destination-out" : "source-over";
    context.strokeStyle = "#fff";
    context.lineWidth = width;
    context.lineCap = "round";
    context.lineJoin = "round";
    context.beginPath();
    context.moveTo(from.x, from.y);
    context.lineTo(to.x + 0.01, to.y); // a zero-length line draws nothing: nudge it into a dot
    context.stroke();
    if (state.brush !== "eraser") source.painted = true;
  }
  drawOverlay();
}

function strokeStart(event) {
  if (!canvasSource() || event.button !== 0) return;
  stroke.touched = strokeTargets();
  if (stroke.touched.length === 0) return;
  stroke.active = true;
  $("paint").setPointerCapture(event.pointerId);
  const point = maskPoint(event);
  paintSegment(point, point);
  Object.assign(stroke, point);
}

function strokeMove(event) {
  if (!stroke.active) return;
  const point = maskPoint(event);
  paintSegment(stroke, point);
  Object.assign(stroke, point);
}

function strokeEnd() {
  if (!stroke.active) return;
  stroke.active = false;
  for (const source of stroke.touched) source.painted = hasPaint(source.mask);
  renderPaintedLabels();
  drawOverlay();
  if (state.run) sendMaps(stroke.touched);
}

function hasPaint(mask) {
  const pixels = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height).data;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) return true;
  return false;
}

function clearMaps() {
  const painted = state.sources.filter((s) => s.painted);
  for (const source of painted) {
    source.mask = blankMask();
    source.painted = false;
  }
  renderPaintedLabels();
  drawOverlay();
  if (state.run && painted.length) sendMaps(painted);
}

function mapPng(mask) {
  // White where painted, black elsewhere: the gateway reads the map's luminance.
  const map = document.createElement("canvas");
  map.width = mask.width;
  map.height = mask.height;
  const context = map.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, map.width, map.height);
  context.drawImage(mask, 0, 0);
  return map.toDataURL("image/png").slice("data:image/png;base64,".length);
}

// --- a run -----------------------------------------------------------------------------------

function sourceMessage(source) {
  const message = { styleWeight: source.style, contentWeight: source.content };
  if (source.painted) message.styleMap = { data: mapPng(source.mask) };
  return message;
}

async function uploadAll() {
  // Uploads live in the gateway's memory; sending them again costs little and survives a
  // gateway restart or eviction since the page added them.
  const uploads = await Promise.all(state.sources.map((s) => uploadImage(s.blob)));
  return uploads.map((u) => u.uploadId);
}

async function start() {
  if (state.run) return;
  if (state.sources.length === 0) {
    showMessage("Add at least one source first: a content photo and a style image.");
    return;
  }
  clearMessage();
  setRunning(true);
  let ids;
  try {
    ids = await uploadAll();
  } catch (error) {
    showError(error, "The sources could not be sent");
    setRunning(false);
    return;
  }
  const request = {
    sources: state.sources.map((s, i) => ({ uploadId: ids[i], ...sourceMessage(s) })),
    maxSidePx: Number($("size").value),
    iterations: Number($("iterations").value),
    optimizer: $("optimizer").value,
    preserveColor: $("color").value,
  };
  Object.assign(request, onePassOptions() || {});
  openSession(request);
}

function openSession(request) {
  const socket = new WebSocket(socketUrl());
  state.run = {
    socket,
    nextUpdateId: 1,
    lastSentId: 0,
    pending: new Set(),
    timer: null,
    ended: false,
    gotResult: false,
    fast: Boolean(request.fast),
    universal: Boolean(request.universal),
  };
  resetStatus();
  socket.addEventListener("open", () => {
    if (state.token) socket.send(JSON.stringify({ token: state.token }));
    socket.send(JSON.stringify({ start: request }));
  });
  socket.addEventListener("message", (event) => onFrame(JSON.parse(event.data)));
  socket.addEventListener("close", onClose);
}

function send(message) {
  const run = state.run;
  if (!run || run.ended || run.socket.readyState !== WebSocket.OPEN) return;
  run.socket.send(JSON.stringify(message));
}

function sendUpdate(changes) {
  const run = state.run;
  if (!run || run.ended) return;
  const updateId = run.nextUpdateId++;
  send({ update: { updateId, ...changes } });
  run.lastSentId = updateId;
  $("update-status").dataset.sentId = String(updateId);
  renderUpdateStatus();
}

function flushWeights() {
  const run = state.run;
  if (!run) return;
  clearTimeout(run.timer);
  run.timer = null;
  if (run.pending.size === 0) return;
  const changed = state.sources
    .map((source, index) => ({ source, index }))
    .filter(({ source }) => run.pending.has(source.key));
  run.pending.clear();
  sendUpdate({
    sources: changed.map(({ source, index }) => ({
      index, styleWeight: source.style, contentWeight: source.content,
    })),
  });
}

function sendMaps(sources) {
  sendUpdate({
    sources: sources.map((source) => {
      const index = state.sources.indexOf(source);
      return source.painted
        ? { index, styleMap: { data: mapPng(source.mask) } }
        : { index, clearStyleMap: true };
    }),
  });
}

function finish() {
  flushWeights();
  send({ finish: {} });
  $("finish").disabled = true;
  $("iteration").textContent += " Finishing…";
}

function setRunning(running) {
  $("start").disabled = running;
  $("finish").disabled = !running;
  for (const id of ["size", "iterations", "optimizer", "color", "upload", "mode"]) {
    $(id).disabled = running;
  }
  document.querySelectorAll(".sample, .source .remove").forEach((b) => { b.disabled = running; });
}

// --- events from the server ------------------------------------------------------------------

function onFrame(frame) {
  if (frame.error) {
    if (frame.error.code === "UNAUTHENTICATED") askForToken(frame.error.message);
    const started = Boolean($("iteration").dataset.iteration);
    const what = started ? "The blend stopped" : "The blend was refused";
    showMessage(`${what}: ${frame.error.message} (${frame.error.code})`);
    return;
  }
  const event = frame.event || {};
  if (event.progress) onProgress(event.progress);
  else if (event.preview) onPreview(event.preview);
  else if (event.result) onResult(event.result);
  else if (event.updateRejected) onRejected(event.updateRejected);
}

function onProgress(progress) {
  const done = progress.iteration || 0;
  const total = progress.iterationsTotal || 0;
  $("progress").max = total || 1;
  $("progress").value = done;
  const scale = (progress.scale || 0) + 1;
  const scales = progress.scalesTotal > 1 ? ` · scale ${scale}/${progress.scalesTotal}` : "";
  const rate = progress.iterationsPerSecond ? ` · ${progress.iterationsPerSecond.toFixed(1)} it/s` : "";
  const line = $("iteration");
  line.textContent = `Iteration ${done} / ${total}${scales}${rate}`;
  line.dataset.iteration = String(done);
  const losses = progress.losses || {};
  for (const name of ["content", "style", "tv", "total"]) {
    $(`loss-${name}`).textContent = formatLoss(losses[name] || 0);
  }
  const status = $("update-status");
  status.dataset.updateId = String(Number(progress.updateId || 0)); // uint64 arrives as a string
  status.dataset.updateIteration = String(progress.updateIteration || 0);
  renderUpdateStatus();
}

function formatLoss(value) {
  return value === 0 ? "0" : value.toPrecision(3);
}

function renderUpdateStatus() {
  const status = $("update-status");
  const inEffect = Math.max(
    Number(status.dataset.updateId || 0), Number(status.dataset.fastUpdateId || 0)
  );
  const since = Number(status.dataset.updateIteration || 0);
  const sent = state.run ? state.run.lastSentId : 0;
  let text = inEffect ? `Update #${inEffect} in effect since iteration ${since}.` : "The blend as started.";
  if (sent > inEffect) text += ` Waiting for update #${sent}…`;
  else if (!sent) text += " Move a slider or paint to change it as it runs.";
  status.textContent = text;
}

function onPreview(preview) {
  if (state.run && state.run.gotResult) return;
  setAspect(preview.widthPx, preview.heightPx);
  // The one-pass images are PNG, the reconstruction's previews JPEG.
  const onePass = preview.fast || preview.universal;
  const type = onePass ? "png" : "jpeg";
  showImage(`data:image/${type};base64,${preview.image}`, "preview", preview.iteration || 0);
  if (onePass) {
    const status = $("update-status");
    status.dataset.fastUpdateId = String(Number(preview.updateId || 0));
    const maker = preview.fast ? "Fast network" : "Universal";
    $("iteration").textContent = `${maker} image for update #${Number(preview.updateId || 0)}`;
    renderUpdateStatus();
  }
  state.showing = "preview";
  drawOverlay();
}

function onResult(result) {
  state.run.gotResult = true;
  const bytes = Uint8Array.from(atob(result.image), (c) => c.charCodeAt(0));
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
  const stats = result.stats || {};
  showImage(state.resultUrl, "result", stats.iterations || 0);
  state.showing = "result";
  $("result-image").src = state.resultUrl;
  $("download").href = state.resultUrl;
  const early = stats.finishedEarly ? ", finished early" : "";
  const made = stats.iterations
    ? `${stats.iterations} iterations in ${(stats.seconds || 0).toFixed(1)} s${early}`
    : state.run.universal
      ? "made in one pass by the universal decoders"
      : "made by the fast network";
  $("result-stats").textContent =
    `${result.widthPx}×${result.heightPx} px · ${made}. The PNG carries its recipe.`;
  $("result").hidden = false;
  $("iteration").textContent = stats.iterations ? `Done: ${stats.iterations} iterations.` : "Done.";
}

function onRejected(rejected) {
  const code = CODES[rejected.code] || `code ${rejected.code}`;
  const id = Number(rejected.updateId || 0);
  showMessage(`Update #${id} was refused, so the blend goes on as before: ${rejected.message} (${code})`);
}

function onClose(event) {
  const run = state.run;
  if (!run) return;
  run.ended = true;
  clearTimeout(run.timer);
  state.run = null;
  setRunning(false);
  if (run.gotResult) return;
  $("iteration").textContent = "Stopped without a result.";
  $("update-status").textContent = "";
  if ($("message").hidden) {
    const reason = event.reason ? `: ${event.reason}` : "";
    showMessage(`The connection to the studio server closed before a result (${event.code}${reason}).`);
  }
}

function resetStatus() {
  $("result").hidden = true;
  $("progress").value = 0;
  $("iteration").textContent = "Starting: extracting features…";
  delete $("iteration").dataset.iteration;
  const status = $("update-status");
  for (const key of ["updateId", "updateIteration", "sentId", "fastUpdateId"]) {
    delete status.dataset[key];
  }
  renderUpdateStatus();
}

// --- wiring ----------------------------------------------------------------------------------

function wire() {
  $("upload").addEventListener("change", addOwnFile);
  $("start").addEventListener("click", start);
  $("mode").addEventListener("change", modeChanged);
  $("strength").addEventListener("input", strengthMoved);
  $("finish").addEventListener("click", finish);
  $("clear-maps").addEventListener("click", clearMaps);
  $("token-form").addEventListener("submit", tokenEntered);
  $("brushes").addEventListener("change", (event) => {
    state.brush = event.target.value === "eraser" ? "eraser" : Number(event.target.value);
  });
  const size = $("brush-size");
  size.addEventListener("input", () => { $("brush-size-value").textContent = `${size.value} px`; });
  const paint = $("paint");
  paint.width = state.maskWidth;
  paint.height = state.maskHeight;
  paint.addEventListener("pointerdown", strokeStart);
  paint.addEventListener("pointermove", strokeMove);
  paint.addEventListener("pointerup", strokeEnd);
  paint.addEventListener("pointercancel", strokeEnd);
}

wire();
refreshStage();
loadInfo();
loadSamples();
