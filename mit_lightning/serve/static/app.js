// The page of `mit serve`: pick an adapter, give it an image and a text, show what it answers.
// It only calls the server's own API (GET /adapters, POST /adapters/<name>/<task endpoint>).
"use strict";

const ENDPOINTS = { segmentation: "segment", classification: "classify", sentiment: "sentiment" };
const $ = (id) => document.getElementById(id);
let adapters = [];
let imageFile = null;

function current() {
  return adapters.find((adapter) => adapter.name === $("adapter").value);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function element(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  Object.entries(attributes).forEach(([key, value]) => {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  });
  children.forEach((child) => node.appendChild(child));
  return node;
}

// --- the form follows the adapter's task ---------------------------------------------------------
function showFields() {
  const adapter = current();
  if (!adapter) return;
  $("image-field").hidden = !adapter.image;
  $("expressions-field").hidden = adapter.task !== "segmentation";
  $("text-field").hidden = adapter.task === "segmentation";
  $("sequences-field").hidden = Object.keys(adapter.sequences).length === 0;
  const inputs = Object.entries(adapter.sequences).map(([name, size]) => `${name} (steps × ${size})`);
  $("adapter-info").textContent =
    `${adapter.task} · ${adapter.fusion} + ${adapter.head}` +
    (adapter.image ? ` · image ${adapter.image_size}×${adapter.image_size}` : "") +
    (inputs.length ? ` · ${inputs.join(", ")}` : "") +
    (adapter.classes ? ` · ${adapter.classes.length} classes` : "") +
    ` · ${adapter.source}`;
  $("results").replaceChildren();
  showError("");
}

async function loadAdapters() {
  const response = await fetch("/adapters");
  adapters = (await response.json()).adapters;
  $("adapter").replaceChildren(
    ...adapters.map((adapter) => element("option", { value: adapter.name, text: `${adapter.name} (${adapter.task})` })),
  );
  showFields();
}

// --- the image -------------------------------------------------------------------------------------
function takeImage(file) {
  if (!file) return;
  imageFile = file;
  $("results").replaceChildren();  // the answers were about the previous image
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("drop-hint").hidden = true;
}

function setUpDropZone() {
  const zone = $("drop-zone");
  zone.addEventListener("click", () => $("image-input").click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("image-input").click();
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    takeImage(event.dataTransfer.files[0]);
  });
  $("image-input").addEventListener("change", (event) => takeImage(event.target.files[0]));
}

// --- asking the server -----------------------------------------------------------------------------
function request(adapter) {
  if (adapter.task === "sentiment") {
    let sequences = {};
    const written = $("sequences").value.trim();
    if (written) {
      try {
        sequences = JSON.parse(written);
      } catch (error) {
        throw new Error(`The feature sequences are not valid JSON: ${error.message}`);
      }
    }
    const body = JSON.stringify({ text: $("text").value, sequences });
    return { method: "POST", headers: { "Content-Type": "application/json" }, body };
  }
  if (!imageFile) throw new Error("Choose an image first (drop it on the dashed box).");
  const form = new FormData();
  form.append("image", imageFile);
  if (adapter.task === "segmentation") {
    const lines = $("expressions").value.split("\n").map((line) => line.trim()).filter(Boolean);
    if (!lines.length) throw new Error("Type an expression, e.g. \"the red circle\".");
    lines.forEach((line) => form.append("expression", line));
    if ($("probability-map").checked) form.append("probability_map", "true");
  } else {
    form.append("text", $("text").value);
  }
  return { method: "POST", body: form };
}

async function run(event) {
  event.preventDefault();
  const adapter = current();
  showError("");
  $("results").replaceChildren();  // never leave an earlier answer beside a new question
  let options;
  try {
    options = request(adapter);
  } catch (error) {
    showError(error.message);
    return;
  }
  $("run").disabled = true;
  try {
    const url = `/adapters/${encodeURIComponent(adapter.name)}/${ENDPOINTS[adapter.task]}`;
    const response = await fetch(url, options);
    const answer = await response.json();
    if (!response.ok) {
      showError(answer.error || `The server answered ${response.status}.`);
      return;
    }
    $("results").replaceChildren(...RENDER[adapter.task](answer));
  } catch (error) {
    showError(`No answer from the server: ${error.message}`);
  } finally {
    $("run").disabled = false;
  }
}

// --- showing the answer ------------------------------------------------------------------------------
function png(data, alt, className) {
  return element("img", { src: `data:image/png;base64,${data}`, alt, class: className });
}

function figure(image, caption) {
  return element("figure", {}, [image, element("figcaption", { text: caption })]);
}

const RENDER = {
  segmentation: (answer) => answer.results.map((result) => element("article", { class: "card result" }, [
    element("h2", { text: `“${result.expression}”` }),
    element("div", { class: "pair" }, [
      figure(png(result.overlay_png, `mask of ${result.expression} over the image`, "overlay"), "mask over the image"),
      figure(png(result.mask_png, `mask of ${result.expression}`, "mask"),
        `mask, ${answer.width}×${answer.height}, ${(100 * result.foreground).toFixed(1)}% of the image, ` +
        `confidence ${(100 * result.confidence).toFixed(0)}%`),
      ...(result.probability_png ? [figure(png(result.probability_png, `foreground probability of ${result.expression}`,
        "mask"), "foreground probability (white: 1)")] : []),
    ]),
    element("p", { class: "prompt", text: `prompt: ${result.prompt}` }),
  ])),
  classification: (answer) => [element("article", { class: "card result" }, [
    element("h2", { text: "Label" }),
    element("p", { class: "label", text: answer.label }),
    ...answer.probabilities.slice(0, 5).map((item) => element("div", { class: "bar" }, [
      element("span", { text: item.label }),
      element("div", { class: "fill", style: `width: ${(100 * item.probability).toFixed(1)}%` }),
      element("span", { text: `${(100 * item.probability).toFixed(1)}%` }),
    ])),
    element("p", { class: "prompt", text: `prompt: ${answer.prompt}` }),
  ])],
  sentiment: (answer) => [element("article", { class: "card result" }, [
    element("h2", { text: "Sentiment score (−3 … +3)" }),
    element("p", { class: "label", text: answer.score.toFixed(2) }),
    element("div", { class: "scale" }, [
      element("div", { class: "mark", style: `left: ${((Math.max(-3, Math.min(3, answer.score)) + 3) / 6) * 100}%` }),
    ]),
    element("p", { class: "prompt", text: `prompt: ${answer.prompt}` }),
  ])],
};

function fillZeros() {
  const adapter = current();
  const zeros = Object.fromEntries(Object.entries(adapter.sequences).map(
    ([name, size]) => [name, Array.from({ length: 20 }, () => Array(size).fill(0))],
  ));
  $("sequences").value = JSON.stringify(zeros);
}

setUpDropZone();
$("adapter").addEventListener("change", showFields);
$("query").addEventListener("submit", run);
$("zeros").addEventListener("click", fillZeros);
loadAdapters().catch((error) => showError(`Cannot list the adapters: ${error.message}`));
