# ruff: noqa: E501  (the app's script and stylesheet are JavaScript and CSS text, wrapped as such)
"""The page of `vsae serve`: one HTML document with its CSS and JS inline (no CDN, no other file), and the small
script that adds "try your own text" to a served dashboard's latent page.

The page reuses the dashboards' stylesheet and `VSAE.el` / `VSAE.fmt` (dashboards/assets.py). Model text reaches
the DOM only through `textContent` (`VSAE.el`'s "text" and text-node children), never as markup.
"""

from __future__ import annotations

from dashboards.assets import CSS, JS
from dashboards.html import page, script_json

SERVE_CSS = r"""
textarea { width: 100%; font: 13px ui-monospace, Menlo, Consolas, monospace; padding: 6px; }
input[type=number] { width: 80px; } input[type=search] { width: 320px; font-size: 14px; padding: 4px 8px; }
section { margin-bottom: 12px; } section[hidden] { display: none; }
button { font-size: 13px; padding: 3px 10px; cursor: pointer; } button:disabled { cursor: wait; }
.toolbar label { color: var(--muted); font-size: 13px; }
.chip { display: inline-flex; gap: 3px; align-items: baseline; margin: 0 8px 2px 0; white-space: nowrap; }
.chip button.lat { padding: 0 5px; font: 12px ui-monospace, Menlo, Consolas, monospace; border: 1px solid var(--line);
                   background: #fff7ed; border-radius: 3px; }
.chip .act { color: var(--muted); font-size: 11.5px; font-variant-numeric: tabular-nums; }
table.tokens td { border-bottom: 1px solid #f0f0f0; padding: 2px 12px 2px 0; }
.tok.sel { outline: 2px solid #1d4ed8; outline-offset: -1px; }
.tok.prompt { color: var(--muted); } .tok.diff { text-decoration: underline 2px #1d4ed8; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.status { color: var(--muted); font-size: 12.5px; min-height: 1.4em; }
tr.iv td { padding: 2px 8px 2px 0; }
"""

# Shared by the page and the dashboards' latent pages: the JSON API client and a token strip coloured by value.
RENDER_JS = r"""
"use strict";
window.VSAEServe = (function () {
  const el = VSAE.el, fmt = VSAE.fmt;

  async function api(path, body) {
    const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
    const r = await fetch(path, opts);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) throw new Error((data && data.error) || ("HTTP " + r.status));
    return data;
  }

  // tokens as spans; value v colours the background (orange for v > 0; with signed, red up / green down), scale is
  // the value of full colour; the title holds the value.
  function tokenStrip(tokens, values, scale, opts) {
    opts = opts || {};
    const strip = el("div", { class: "toks" });
    tokens.forEach((tok, i) => {
      const v = values ? values[i] : null;
      const s = el("span", { class: "tok" + (opts.cls ? " " + opts.cls(i) : ""), text: tok,
                             title: v === null || v === undefined ? null : (opts.label || "value") + " " + fmt(v, 4) });
      if (typeof v === "number" && v !== 0 && scale > 0) {
        const a = Math.min(1, 0.08 + 0.92 * Math.abs(v) / scale).toFixed(3);
        s.style.backgroundColor = opts.signed ? (v > 0 ? "rgba(220, 38, 38, " + a + ")" : "rgba(22, 163, 74, " + a + ")")
                                              : (v > 0 ? "rgba(234, 88, 12, " + a + ")" : "");
      }
      if (opts.onclick) { s.style.cursor = "pointer"; s.addEventListener("click", () => opts.onclick(i, s)); }
      strip.append(s);
    });
    return strip;
  }

  function maxAbs(values) { return values.reduce((m, v) => (typeof v === "number" ? Math.max(m, Math.abs(v)) : m), 0); }

  // Runs `work` (a promise-returning function) with `button` disabled and `status` saying so; errors go to status.
  async function busy(button, status, work) {
    button.disabled = true;
    status.textContent = "working ...";
    status.className = "status";
    try {
      await work();
      status.textContent = "";
    } catch (e) {
      status.textContent = e.message;
      status.className = "status warn";
    } finally {
      button.disabled = false;
    }
  }

  // The "try your own text" box: a text area, a button and the latent's activation per token.
  function tryBox(run, latent, initial) {
    const text = el("textarea", { id: "try-text", rows: "3", placeholder: "type a text" });
    text.value = initial || "";
    const go = el("button", { id: "try-go", type: "button", text: "Show activations" });
    const status = el("div", { class: "status" });
    const out = el("div", { id: "try-out" });
    go.addEventListener("click", () => busy(go, status, async () => {
      const r = await api("/api/latent/activations", { run: run, latent: latent, text: text.value });
      out.replaceChildren(el("p", { class: "note", text: "max activation on this text: " + fmt(r.max) + " (hover a token for its value)" }),
                          tokenStrip(r.tokens, r.acts, r.max, { label: "activation" }));
    }));
    return el("div", { class: "try" }, el("h3", { text: "Try your own text" }), text, el("div", { class: "toolbar" }, go), status, out);
  }

  return { api, tokenStrip, maxAbs, busy, tryBox };
})();
"""

APP_JS = r"""
VSAEServe.start = function (doc) {
  const { el, fmt } = VSAE;
  const { api, tokenStrip, maxAbs, busy, tryBox } = VSAEServe;
  const $ = (id) => document.getElementById(id);
  const runs = doc.runs, byName = Object.fromEntries(runs.map((r) => [r.name, r]));

  // ---- runs -----------------------------------------------------------------------------------------------
  const rt = $("runs");
  rt.append(el("tr", {}, ...["run", "latents", "k", "hook", "dashboard"].map((h) => el("th", { text: h }))));
  for (const r of runs) {
    rt.append(el("tr", {}, el("td", { text: r.name, title: r.path }), el("td", { class: "num", text: String(r.d_sae) }),
                 el("td", { class: "num", text: String(r.k) }), el("td", { text: r.hook }),
                 el("td", {}, r.dashboard ? el("a", { href: r.dashboard, target: "_blank", text: "index" }) : el("span", { class: "muted", text: "none given" }))));
  }
  for (const id of ["steer-run", "ablate-run"]) {
    for (const r of runs) $(id).append(el("option", { value: r.name, text: r.name }));
  }

  function dashLink(url) { return url ? el("a", { href: url, target: "_blank", title: "its page in the dashboard", text: "\u2197" }) : ""; }

  function latentChip(run, id, act, url) {
    const b = el("button", { type: "button", class: "lat", title: "inspect latent " + id + " of " + run, text: String(id) });
    b.addEventListener("click", () => openLatent(run, id));
    return el("span", { class: "chip" }, b, act === null ? "" : el("span", { class: "act", text: fmt(act) }), dashLink(url));
  }

  // ---- test text --------------------------------------------------------------------------------------------
  $("text-go").addEventListener("click", () => busy($("text-go"), $("text-status"), async () => {
    const r = await api("/api/activations", { text: $("text").value, top: Number($("text-top").value) });
    const table = el("table", { class: "data tokens" });
    table.append(el("tr", {}, el("th", { text: "#" }), el("th", { text: "token" }), ...r.runs.map((x) => el("th", { text: x.run }))));
    const rows = r.tokens.map((tok, t) => {
      const tr = el("tr", {}, el("td", { class: "num muted", text: String(t) }), el("td", {}, el("span", { class: "tok tokcell", text: tok })));
      for (const x of r.runs) {
        const cell = el("td");
        if (r.special[t]) cell.append(el("span", { class: "muted", text: "special token: no latents" }));
        for (const [id, act] of x.latents[t]) {
          cell.append(latentChip(x.run, id, act, x.dashboard ? x.dashboard + "latent.html#" + id : null));
        }
        tr.append(cell);
      }
      table.append(tr);
      return tr;
    });
    // the text as a strip: clicking a token brings its row into view
    const strip = tokenStrip(r.tokens, null, 0, { onclick: (t, span) => {
      strip.querySelectorAll(".sel").forEach((s) => s.classList.remove("sel"));
      span.classList.add("sel");
      rows[t].scrollIntoView({ block: "center" });
    } });
    $("text-out").replaceChildren(el("p", { class: "note", text: r.tokens.length + " tokens; per token, each run's most active latents (click an id to inspect it, \u2197 for its dashboard page)" }), strip, table);
  }));

  // ---- latent view ------------------------------------------------------------------------------------------
  async function openLatent(run, id) {
    const sec = $("sec-latent");
    sec.hidden = false;
    $("latent-body").replaceChildren(el("p", { class: "muted", text: "loading latent " + id + " ..." }));
    sec.scrollIntoView({ block: "start" });
    try {
      const info = await api("/api/latent?run=" + encodeURIComponent(run) + "&latent=" + id);
      const title = el("h2", { id: "latent-title", text: "Latent " + id + " of " + run });
      const links = el("div", { class: "toolbar" });
      if (info.dashboard) links.append(el("a", { href: info.dashboard, target: "_blank", text: "dashboard page \u2197" }));
      const steer = el("button", { type: "button", id: "latent-steer", text: "steer with it" });
      steer.addEventListener("click", () => { $("steer-run").value = run; addIntervention(id, "add", 10); $("sec-steer").scrollIntoView(); });
      const ablate = el("button", { type: "button", id: "latent-ablate", text: "ablate it" });
      ablate.addEventListener("click", () => {
        $("ablate-run").value = run; $("ablate-latent").value = id;
        if (!$("ablate-text").value) $("ablate-text").value = $("try-text").value;
        $("sec-ablate").scrollIntoView();
      });
      links.append(steer, ablate, el("span", { class: "muted", text: info.hook + ", " + info.d_sae + " latents" }));
      const logits = el("div", {}, el("h3", { text: "Logit effects" }), el("p", { class: "note", text: info.logits.definition }));
      const side = el("div", { class: "side" });
      for (const [label, list, cls] of [["positive", info.logits.pos, "pos"], ["negative", info.logits.neg, "neg"]]) {
        const t = el("table", { class: "data" }, el("tr", {}, el("th", { text: "token" }), el("th", { class: "num", text: "effect" })));
        for (const [tok, v] of list) t.append(el("tr", {}, el("td", { class: "tokcell", text: tok }), el("td", { class: "num " + cls, text: fmt(v) })));
        side.append(el("div", {}, el("b", { text: label }), t));
      }
      logits.append(side);
      $("latent-body").replaceChildren(title, links, el("div", { class: "grid" }, tryBox(run, id, $("text").value), logits));
    } catch (e) {
      $("latent-body").replaceChildren(el("p", { class: "warn", text: e.message }));
    }
  }

  // ---- search -----------------------------------------------------------------------------------------------
  function search() {
    return busy($("search-go"), $("search-status"), async () => {
      const r = await api("/api/search?q=" + encodeURIComponent($("search-q").value));
      const t = el("table", { class: "data" }, el("tr", {}, ...["run", "latent", "why"].map((h) => el("th", { text: h }))));
      for (const h of r.hits) t.append(el("tr", {}, el("td", { text: h.run }), el("td", {}, latentChip(h.run, h.latent, null, h.dashboard)), el("td", { text: h.why.join("; ") })));
      $("search-out").replaceChildren(el("p", { class: "note", text: r.hits.length + " latents for " + JSON.stringify(r.query) }), t);
    });
  }
  $("search-go").addEventListener("click", search);
  $("search-q").addEventListener("keydown", (e) => { if (e.key === "Enter") search(); });

  // ---- steering ---------------------------------------------------------------------------------------------
  function addIntervention(latent, mode, value) {
    const id = el("input", { type: "number", class: "iv-latent", min: "0", step: "1", value: String(latent) });
    const sel = el("select", { class: "iv-mode" }, el("option", { value: "add", text: "add (value \u00d7 decoder row)" }), el("option", { value: "clamp", text: "clamp (set to value)" }));
    sel.value = mode;
    const v = el("input", { type: "number", class: "iv-value", step: "any", value: String(value) });
    const rm = el("button", { type: "button", text: "remove" });
    const tr = el("tr", { class: "iv" }, el("td", {}, "latent ", id), el("td", {}, sel), el("td", {}, "value ", v), el("td", {}, rm));
    rm.addEventListener("click", () => tr.remove());
    $("steer-list").append(tr);
  }
  $("steer-add").addEventListener("click", () => addIntervention(0, "add", 10));
  $("steer-go").addEventListener("click", () => busy($("steer-go"), $("steer-status"), async () => {
    const interventions = [...$("steer-list").querySelectorAll("tr.iv")].map((tr) => ({
      latent: Number(tr.querySelector(".iv-latent").value), mode: tr.querySelector(".iv-mode").value, value: Number(tr.querySelector(".iv-value").value) }));
    const r = await api("/api/steer", { run: $("steer-run").value, prompt: $("steer-prompt").value, interventions: interventions,
                                        max_new_tokens: Number($("steer-n").value), temperature: Number($("steer-temp").value), seed: Number($("steer-seed").value) });
    const column = (label, id, toks, other) => el("div", { id: id }, el("h3", { text: label }),
      tokenStrip(r.prompt.concat(toks), null, 0, { cls: (i) => (i < r.prompt.length ? "prompt" : (toks[i - r.prompt.length] !== other[i - r.prompt.length] ? "diff" : "")) }));
    const what = r.interventions.length ? r.interventions.map((iv) => iv.mode + " " + iv.latent + " " + fmt(iv.value)).join(", ") : "no intervention";
    $("steer-out").replaceChildren(el("p", { class: "note", text: (r.temperature > 0 ? "sampled at temperature " + r.temperature + ", seed " + r.seed : "greedy") + "; steered: " + what + " at " + r.run + "'s hook (error term kept); underlined: tokens that differ" }),
      el("div", { class: "cols" }, column("unsteered", "steer-plain", r.unsteered, r.unsteered), column("steered", "steer-steered", r.steered, r.unsteered)));
  }));

  // ---- ablation ---------------------------------------------------------------------------------------------
  $("ablate-go").addEventListener("click", () => busy($("ablate-go"), $("ablate-status"), async () => {
    const r = await api("/api/ablate", { run: $("ablate-run").value, latent: Number($("ablate-latent").value), text: $("ablate-text").value });
    $("ablate-out").replaceChildren(
      el("p", { class: "note", text: "Latent " + r.latent + " of " + r.run + " removed (its activation set to 0, the SAE's error term kept): mean change in next-token loss " + fmt(r.mean_delta) + " nats. Red: the token became harder to predict, green: easier; hover for the change." }),
      el("h3", { text: "change in the loss of predicting each token" }), tokenStrip(r.tokens, r.delta, maxAbs(r.delta), { signed: true, label: "\u0394 loss" }),
      el("h3", { text: "the latent's activation" }), tokenStrip(r.tokens, r.acts, maxAbs(r.acts), { label: "activation" }));
  }));
};
"""

# Added to a served dashboard's latent page: "try your own text" under the latent, for the run named by data-run.
LATENT_TRY_JS = RENDER_JS + r"""
(function () {
  const run = document.currentScript.dataset.run;
  // Adds the box under the latent shown now, once: the page may have drawn it before this script ran.
  function addBox() {
    const main = document.getElementById("latent"), h1 = main && main.querySelector("h1");
    const id = Number(decodeURIComponent(window.location.hash.slice(1)));
    if (h1 && h1.textContent === "Latent " + id && !main.querySelector(".try")) main.append(VSAEServe.tryBox(run, id, ""));
  }
  const show = VSAE.latent;
  VSAE.latent = function (doc) { show(doc); addBox(); };
  addBox();
})();
"""

SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog."


def _body(limits: dict) -> str:
    n = limits["max_new_tokens"]
    return f"""<h1>vsae serve</h1>
<p class="note">Ask the model: which latents fire on a text, which latents a token brings up, what a latent does when
steered or removed. Texts start with BOS, as the SAEs' training contexts did; at most {limits['max_tokens']} tokens.</p>
<table class="data" id="runs"></table>
<section id="sec-text"><h2>Test text</h2>
<textarea id="text" rows="3">{SAMPLE_TEXT}</textarea>
<div class="toolbar"><button type="button" id="text-go">Show latents</button>
<label>latents per token <input type="number" id="text-top" min="1" max="{limits['max_top']}" value="{limits['top_latents']}"></label></div>
<div class="status" id="text-status"></div><div id="text-out"></div></section>
<section id="sec-latent" hidden><div id="latent-body"></div></section>
<section id="sec-search"><h2>Search</h2>
<div class="toolbar"><input type="search" id="search-q" placeholder="a token (e.g. the) or a latent id">
<button type="button" id="search-go">Search</button></div>
<p class="note">A token finds the latents that fire most on it (the top tokens of their dashboard's top contexts, where a
dashboard is served) or whose logit effects promote it; a number finds that latent id in every run.</p>
<div class="status" id="search-status"></div><div id="search-out"></div></section>
<section id="sec-steer"><h2>Steering</h2>
<div class="toolbar"><label>run <select id="steer-run"></select></label></div>
<textarea id="steer-prompt" rows="2">{SAMPLE_TEXT}</textarea>
<table id="steer-list"></table>
<div class="toolbar"><button type="button" id="steer-add">add a latent</button>
<label>tokens <input type="number" id="steer-n" min="1" max="{n}" value="{min(32, n)}"></label>
<label>temperature <input type="number" id="steer-temp" min="0" max="10" step="any" value="0"></label>
<label>seed <input type="number" id="steer-seed" min="0" step="1" value="0"></label>
<button type="button" id="steer-go">Generate</button></div>
<p class="note">The prompt continued by the plain model and by the model with the latents edited at the SAE's hook
(x' = x + (z' - z) W_dec: the SAE's error term is kept, so no edit reproduces the model exactly), from the same seed.
Temperature 0 is greedy.</p>
<div class="status" id="steer-status"></div><div id="steer-out"></div></section>
<section id="sec-ablate"><h2>Ablation</h2>
<div class="toolbar"><label>run <select id="ablate-run"></select></label>
<label>latent <input type="number" id="ablate-latent" min="0" step="1" value="0"></label></div>
<textarea id="ablate-text" rows="3"></textarea>
<div class="toolbar"><button type="button" id="ablate-go">Ablate</button></div>
<div class="status" id="ablate-status"></div><div id="ablate-out"></div></section>"""


def app_page(runs: list[dict], limits: dict) -> str:
    """The app's HTML document: `runs` from `Explorer.runs_info`, `limits` the request bounds shown in the form."""
    start = f"VSAEServe.start({script_json({'runs': runs, 'limits': limits})});"
    return page("vsae serve", _body(limits), inline=(JS, RENDER_JS, APP_JS, start), css=CSS + SERVE_CSS)
