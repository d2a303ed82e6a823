// The edgetl page: one model.onnx run by onnxruntime-web (wasm) on camera frames or dropped photos.
// API for tests and embedders: window.edgetl.ready (a Promise, resolves when the model is loaded) and
// window.edgetl.classify(urlOrBlob) → Promise of {class, probability, probabilities}.
import { boxReduce, jpegScale, resizeCrop } from "./preprocess.mjs";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const api = (window.edgetl = window.edgetl || {});
let session = null, info = null, ort = null, queue = Promise.resolve();

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.style.display = "block";
  $("meta").textContent = "not loaded";
  api.error = message;
}

async function fetchOk(url, what) {
  let r;
  try {
    r = await fetch(url);
  } catch (e) {
    throw new Error(`${what} (${url}) could not be fetched: ${e.message}`);
  }
  if (!r.ok) {
    throw new Error(`${what} is missing: ${url} answered HTTP ${r.status}. Export the page again with ` +
      "`edgetl export-web MODEL -o DIR`.");
  }
  return r;
}

const isWasm = (b) => b.byteLength >= 4 && b[0] === 0x00 && b[1] === 0x61 && b[2] === 0x73 && b[3] === 0x6d;

async function sha256(bytes) {
  if (!(window.crypto && crypto.subtle)) return null; // only in secure contexts (https, localhost)
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(d, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function load() {
  const t0 = performance.now();
  info = await (await fetchOk("model.json", "the model description")).json();
  const rt = info.runtime;
  const base = new URL("ort/", location.href).href;
  try {
    ort = await import(base + rt.module);
  } catch (e) {
    throw new Error(`the onnxruntime-web runtime ort/${rt.module} could not be loaded (${e.message}). ` +
      "Export the page again with `edgetl export-web MODEL -o DIR`.");
  }
  const wasm = new Uint8Array(await (await fetchOk("ort/" + rt.wasm, "the onnxruntime-web runtime file")).arrayBuffer());
  if (!isWasm(wasm)) {
    throw new Error(`ort/${rt.wasm} is not WebAssembly (the server sent something else for it: no "\\0asm" magic ` +
      "word). Export the page again and serve the whole folder.");
  }
  // onnxruntime-web's own default: half the logical cores, at most 4 (?threads=N overrides)
  const wanted = Number(params.get("threads")) || Math.min(4, Math.ceil((navigator.hardwareConcurrency || 1) / 2));
  const threads = self.crossOriginIsolated ? wanted : 1;
  ort.env.wasm.wasmBinary = wasm.buffer;
  ort.env.wasm.wasmPaths = base;
  ort.env.wasm.numThreads = threads;
  const model = new Uint8Array(await (await fetchOk(info.model, "the model")).arrayBuffer());
  const digest = await sha256(model);
  if (digest && info.sha256 && digest !== info.sha256) {
    throw new Error(`${info.model} is not the file this page was exported with (sha256 differs); export it again.`);
  }
  try {
    const opts = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
    if (params.get("static") !== "0") opts.freeDimensionOverrides = { [info.batch_axis]: 1 }; // the page runs batch 1
    session = await ort.InferenceSession.create(model, opts);
  } catch (e) {
    throw new Error(`onnxruntime-web could not load ${info.model}: ${e.message || e}`);
  }
  const [h, w] = info.spec.input_size;
  await infer(new Uint8Array(h * w * 3)); // the first run allocates; do it before anyone waits on it
  const loadMs = performance.now() - t0;
  api.runtime = { version: rt.version, backend: "wasm", threads, crossOriginIsolated: !!self.crossOriginIsolated,
                  loadMs, readyAtMs: performance.now() };
  api.classes = info.classes;
  api.info = info;
  $("title").textContent = info.name;
  $("meta").textContent = `${info.classes.length} classes: ${info.classes.join(", ")} · input ${h}x${w}` +
    (info.precision ? ` · ${info.precision}` : "");
  $("runtime").textContent = `onnxruntime-web ${rt.version} · wasm · ${threads} thread${threads > 1 ? "s" : ""} ` +
    (self.crossOriginIsolated ? "(cross-origin isolated: threads on; ?threads=N to change)"
      : "(not cross-origin isolated: one thread; serve with COOP/COEP headers, e.g. `edgetl export-web --serve`)") +
    ` · loaded in ${Math.round(loadMs)} ms`;
  $("threshold").value = params.get("threshold") ?? info.threshold ?? 0;
  $("smooth").value = params.get("smooth") ?? info.smooth ?? 1;
  for (const id of ["camera", "file"]) $(id).disabled = false;
  return api.runtime;
}

// One run at a time: an onnxruntime-web session does not take concurrent runs.
function infer(rgb) {
  const run = queue.then(async () => {
    const [h, w] = info.spec.input_size;
    const out = await session.run({ [info.input]: new ort.Tensor("uint8", rgb, [1, h, w, 3]) });
    return Array.from(out[info.output].data);
  });
  queue = run.catch(() => {});
  return run;
}

const canvas = document.createElement("canvas");
const ctx = canvas.getContext("2d", { willReadFrequently: true });

function rgbaOf(source, w, h) {
  canvas.width = w;
  canvas.height = h;
  ctx.drawImage(source, 0, 0, w, h);
  return ctx.getImageData(0, 0, w, h).data;
}

async function toBlob(src) {
  if (src instanceof Blob) return src;
  const r = await fetch(src);
  if (!r.ok) throw new Error(`${src}: HTTP ${r.status}`);
  return r.blob();
}

// A photo → the model's input pixels, as edgetl.data.preprocess.load_image makes them.
async function pixels(src) {
  const blob = await toBlob(src);
  const head = new Uint8Array(await blob.slice(0, 2).arrayBuffer());
  let bmp;
  try {
    bmp = await createImageBitmap(blob, { imageOrientation: "from-image", colorSpaceConversion: "none",
                                          premultiplyAlpha: "none" });
  } catch (e) {
    throw new Error(`not a readable image (${e.message})`);
  }
  let w = bmp.width, h = bmp.height;
  let rgba = rgbaOf(bmp, w, h);
  bmp.close();
  const f = head[0] === 0xff && head[1] === 0xd8 ? jpegScale(w, h, info.spec.resize_size) : 1;
  if (f > 1) [rgba, w, h] = boxReduce(rgba, w, h, f);
  return resizeCrop(rgba, w, h, info.spec);
}

function answer(probs) {
  let best = 0;
  for (let i = 1; i < probs.length; i++) if (probs[i] > probs[best]) best = i;
  return { class: info.classes[best], probability: probs[best], probabilities: probs };
}

async function classify(src) {
  await api.ready;
  return answer(await infer(await pixels(src)));
}

// Median milliseconds of `n` runs on one preprocessed input (batch 1).
async function bench(n = 30) {
  await api.ready;
  const [h, w] = info.spec.input_size;
  const x = new Uint8Array(h * w * 3).map((_, i) => (i * 7) & 255);
  const times = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await infer(x);
    times.push(performance.now() - t);
  }
  times.sort((a, b) => a - b);
  return { median_ms: times[Math.floor(n / 2)], min_ms: times[0], runs: n };
}

// --- the page --------------------------------------------------------------------------------------

function show(probs, unsmoothed) {
  const threshold = Number($("threshold").value) || 0;
  const a = answer(probs);
  const label = a.probability >= threshold ? a.class : "unknown";
  $("label").textContent = `${label} ${a.probability.toFixed(2)}`;
  $("label").className = label === "unknown" ? "unknown" : "";
  const order = probs.map((p, i) => [p, i]).sort((x, y) => y[0] - x[0]).slice(0, 5);
  $("bars").replaceChildren(...order.map(([p, i]) => {
    const row = document.createElement("div");
    row.className = "bar";
    row.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span><span class="p"></span>';
    row.querySelector(".name").textContent = info.classes[i];
    row.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    row.querySelector(".p").textContent = p.toFixed(2);
    return row;
  }));
  api.last = { ...a, label, raw: unsmoothed };
  return api.last;
}

let cameraOn = false;

async function camera() {
  if (cameraOn) {
    cameraOn = false;
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } } });
  } catch (e) {
    showError(`the camera could not be opened: ${e.message || e.name}`);
    return;
  }
  const video = document.createElement("video");
  video.muted = true;
  video.playsInline = true;
  video.srcObject = stream;
  await video.play();
  $("view").replaceChildren(video);
  $("camera").textContent = "Stop camera";
  cameraOn = true;
  const recent = [];
  let last = performance.now(), fps = 0;
  api.frames = 0;
  while (cameraOn) {
    if (video.videoWidth) {
      const w = video.videoWidth, h = video.videoHeight;
      const raw = await infer(resizeCrop(rgbaOf(video, w, h), w, h, info.spec));
      recent.push(raw);
      const n = Math.max(1, Number($("smooth").value) || 1);
      while (recent.length > n) recent.shift();
      const mean = raw.map((_, i) => recent.reduce((s, p) => s + p[i], 0) / recent.length);
      show(mean, raw);
      api.frames++;
      const now = performance.now();
      fps = fps ? 0.9 * fps + 0.1 * (1000 / (now - last)) : 1000 / (now - last);
      last = now;
      $("fps").textContent = `${fps.toFixed(1)} FPS`;
      api.fps = fps;
    }
    await new Promise((r) => requestAnimationFrame(r));
  }
  stream.getTracks().forEach((t) => t.stop());
  $("camera").textContent = "Start camera";
}

async function photos(files) {
  for (const file of files) {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(file);
    $("view").replaceChildren(img);
    try {
      show((await classify(file)).probabilities);
    } catch (e) {
      $("label").textContent = `${file.name}: ${e.message}`;
    }
  }
}

// Offline once loaded: a service worker answers from a cache of the page's files when the server does not
// (secure contexts only: https, localhost). The files fetched before it ran are put in that cache here.
async function keepOffline() {
  if (!("serviceWorker" in navigator) || !self.isSecureContext) return false;
  await navigator.serviceWorker.register("sw.js");
  await navigator.serviceWorker.ready;
  await api.ready;
  const rt = info.runtime;
  const page = location.href.split(/[?#]/)[0];
  const files = [page, "edgetl.mjs", "preprocess.mjs", "model.json", info.model,
                 ...[rt.module, rt.glue, rt.wasm].map((f) => "ort/" + f)];
  const cache = await caches.open("edgetl-page");
  await cache.addAll(files.map((f) => new URL(f, page).href));
  return true;
}

api.classify = classify;
api.pixels = pixels;
api.bench = bench;
api.ready = load();
api.ready.catch((e) => showError(String(e.message || e)));
api.offline = keepOffline().catch(() => false);

$("camera").onclick = camera;
$("file").onchange = (e) => photos([...e.target.files]);
const view = $("view");
view.ondragover = (e) => { e.preventDefault(); view.classList.add("drag"); };
view.ondragleave = () => view.classList.remove("drag");
view.ondrop = (e) => {
  e.preventDefault();
  view.classList.remove("drag");
  cameraOn = false;
  photos([...e.dataTransfer.files].filter((f) => f.type.startsWith("image/")));
};
