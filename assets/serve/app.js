// The page of `vlmatch serve`: one image and caption to /match, a query to
// /search. No build step: plain DOM code.
"use strict";

const $ = (id) => document.getElementById(id);
let picked = null;

function showError(id, message) {
  const el = $(id);
  el.textContent = message;
  el.hidden = !message;
}

async function call(path, init) {
  const response = await fetch(path, init);
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    throw new Error((body && body.error) || `HTTP ${response.status}`);
  }
  return body;
}

// The shade of a word: red with the mismatch probability as its opacity.
function shade(p) {
  return `rgba(214, 39, 40, ${p.toFixed(3)})`;
}

function pick(file) {
  if (!file) return;
  picked = file;
  const img = $("preview");
  img.src = URL.createObjectURL(file);
  img.hidden = false;
  $("drop-hint").textContent = file.name;
}

function showMatch(result) {
  const itm = $("itm");
  itm.textContent = result.itm.toFixed(4);
  itm.dataset.value = String(result.itm);
  $("itm-bar").style.width = `${(100 * result.itm).toFixed(1)}%`;
  $("itc").textContent = result.itc.toFixed(4);
  const words = $("words");
  words.replaceChildren();
  if (result.words) {
    for (const w of result.words) {
      const span = document.createElement("span");
      span.className = "word";
      span.textContent = w.word;
      span.dataset.mismatch = String(w.mismatch);
      span.style.backgroundColor = shade(w.mismatch);
      span.title = `mismatch probability ${w.mismatch.toFixed(3)}`;
      words.append(span, " ");
    }
    $("words-note").textContent = "Words shaded by the discriminator's probability that they do not match the image.";
  } else {
    $("words-note").textContent = "This run has no VL-RTD discriminator: no per-word scores.";
  }
  $("match-result").hidden = false;
  document.body.dataset.matched = "1";
}

async function submitMatch(event) {
  event.preventDefault();
  showError("match-error", "");
  if (!picked) { showError("match-error", "Pick or drop an image first."); return; }
  const form = new FormData();
  form.append("image", picked);
  form.append("caption", $("caption").value);
  try {
    showMatch(await call("/match", { method: "POST", body: form }));
  } catch (e) {
    showError("match-error", e.message);
  }
}

async function submitSearch(event) {
  event.preventDefault();
  showError("search-error", "");
  const hits = $("hits");
  try {
    const answer = await call("/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ query: $("query").value, k: Number($("k").value) }),
    });
    hits.replaceChildren();
    for (const h of answer.hits) {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = h.thumb;
      img.alt = h.path;
      const cap = document.createElement("figcaption");
      cap.textContent = `#${h.rank + 1} · ${h.itc.toFixed(3)}`;
      cap.title = h.path;
      fig.append(img, cap);
      hits.append(fig);
    }
    document.body.dataset.searched = String(answer.hits.length);
  } catch (e) {
    showError("search-error", e.message);
  }
}

async function describe() {
  try {
    const h = await call("/health");
    const f = h.fingerprint;
    const index = h.index ? ` · index of ${h.index.images} images` : " · no index";
    $("model").textContent = `${h.run} · step ${h.step} · ${f.checkpoint} (CRC-32 ${f.checkpoint_crc32.split(" ")[0]}) · config ${f.config_hash}${index}`;
    if (!h.index) $("search").hidden = true;
  } catch (e) {
    $("model").textContent = `cannot reach the server: ${e.message}`;
  }
  document.body.dataset.ready = "1";
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  pick(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", (e) => pick(e.target.files[0]));
$("match-form").addEventListener("submit", submitMatch);
$("search-form").addEventListener("submit", submitSearch);
describe();
