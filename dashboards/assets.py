# ruff: noqa: E501  (the page script and stylesheet are JavaScript and CSS text, wrapped as such)
"""The dashboards' stylesheet and page script, written beside the pages (or inlined in a single-file page).

Kept as Python strings so that they ship with the package in any install. The script renders every piece of
model text with `textContent` (text nodes), never as markup, and loads per-latent data files lazily with
<script> elements (which work from file://, where fetch() of a local file does not).
"""

CSS = r"""
:root { --fg: #1d1d1f; --muted: #6b6b70; --line: #d9d9de; --accent: #c2410c; --bg-alt: #f5f5f7; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); margin: 0 auto;
       padding: 16px 24px 48px; max-width: 1400px; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 17px; margin: 24px 0 8px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 14px 0 6px; }
a { color: #1d4ed8; text-decoration: none; } a:hover { text-decoration: underline; }
.muted, .note { color: var(--muted); } .note { font-size: 12.5px; margin: 4px 0 10px; }
.warn { background: #fff4e5; border: 1px solid #f5c27a; padding: 8px 12px; border-radius: 4px; }
.dead-banner { background: #f3f4f6; border: 1px solid var(--line); padding: 10px 14px; border-radius: 4px;
               font-weight: 600; }
nav.top { display: flex; gap: 16px; align-items: baseline; font-size: 13px; margin-bottom: 4px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr)); gap: 12px 24px; }
.stats { display: flex; flex-wrap: wrap; gap: 8px 28px; margin: 8px 0; }
.stats div b { display: block; font-size: 18px; }
table { border-collapse: collapse; } td, th { padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; }
table.data th { border-bottom: 2px solid var(--line); white-space: nowrap; }
table.data td { border-bottom: 1px solid #eee; }
table.data td.num, table.data th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; user-select: none; } table.sortable th:hover { color: var(--accent); }
table.sortable th.asc::after { content: " \25B2"; } table.sortable th.desc::after { content: " \25BC"; }
tr.dead td { color: #9ca3af; }
.toolbar { display: flex; gap: 16px; align-items: center; margin: 8px 0; }
.toolbar input[type=search] { font-size: 14px; padding: 4px 8px; width: 320px; }
.ctx { display: flex; gap: 10px; padding: 2px 0; border-bottom: 1px solid #f0f0f0; align-items: baseline; }
.ctx-val { min-width: 56px; text-align: right; color: var(--muted); font-variant-numeric: tabular-nums; font-size: 12px; }
.toks { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px;
        white-space: pre-wrap; word-break: break-all; }
.tok { border-radius: 2px; padding: 0 0.5px; }
.tok.mark { outline: 2px solid var(--accent); outline-offset: -1px; font-weight: 700; }
.plot { width: 100%; min-height: 300px; }
.plot.small { min-height: 260px; }
.tokcell { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre; }
.pos { color: #15803d; } .neg { color: #b91c1c; }
.side { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 12px; }
iframe.fig { width: 100%; height: 520px; border: 1px solid var(--line); }
.scroll { overflow-x: auto; max-width: 100%; }
table.wide td:first-child, table.wide th:first-child { position: sticky; left: 0; background: #fff; z-index: 1; }
table.summary td.best { background: #ecfdf3; font-weight: 600; }
table.summary td.ns { color: var(--muted); }
table.summary .mark, table.summary .ival { font-size: 11.5px; font-weight: 400; color: var(--muted); white-space: nowrap; }
table.summary td.best .mark { color: #15803d; }
table.summary .null { font-size: 11.5px; color: var(--muted); white-space: nowrap; }
table.summary .mark.warn { color: #b45309; font-weight: 600; }
table.summary td.note { min-width: 220px; } table.summary td.bestrun { min-width: 220px; }
table.summary td:first-child, table.summary td:nth-child(2) { white-space: nowrap; }
details.group { margin: 6px 0; } details > summary { cursor: pointer; font-weight: 600; margin: 6px 0; }
"""

JS = r"""
"use strict";
window.VSAE = (function () {
  const PLOT_CONFIG = { displaylogo: false, responsive: true };
  const PAGE_ROWS = 500;  // index rows listed at once
  const state = { wanted: null, tsne: null, tsneWaiting: [] };

  function el(tag, props, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of kids) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  function fmt(v, digits) {
    digits = digits || 3;
    if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) return "n/a";
    if (typeof v !== "number") return String(v);
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e5 || a < 1e-3) return v.toExponential(digits - 1);
    return String(Number(v.toPrecision(digits)));
  }

  function pct(v) {
    if (v === null || v === undefined) return "n/a";
    return v === 0 ? "0%" : (v * 100 < 0.01 ? (v * 100).toExponential(1) : fmt(v * 100, 3)) + "%";
  }

  let webgl = null;
  function hasWebgl() {
    if (webgl === null) {
      try { webgl = !!document.createElement("canvas").getContext("webgl"); } catch (e) { webgl = false; }
    }
    return webgl;
  }

  // plotly.js (4.8 MB) loads after the page's own content: plots asked for before it is there wait for it.
  const waitingForPlotly = [];
  let plotlyFailed = false;
  function plotlyReady() { waitingForPlotly.splice(0).forEach((fn) => fn()); }
  function plotlyError() {
    plotlyFailed = true;
    waitingForPlotly.splice(0).forEach((fn) => fn());
  }

  function plot(target, fig, onClickId) {
    if (!target) return;
    if (!window.Plotly) {
      if (plotlyFailed) target.textContent = "plotly.js did not load";
      else waitingForPlotly.push(() => plot(target, fig, onClickId));
      return;
    }
    // Without WebGL (headless, remote desktops) large scatters fall back to SVG rather than fail.
    const data = hasWebgl() ? fig.data : fig.data.map((t) => (t.type === "scattergl" ? Object.assign({}, t, { type: "scatter" }) : t));
    Plotly.newPlot(target, data, fig.layout || {}, PLOT_CONFIG);
    if (onClickId) {
      target.on("plotly_click", (ev) => {
        const p = ev.points && ev.points[0];
        if (p && p.customdata !== undefined) onClickId(Array.isArray(p.customdata) ? p.customdata[0] : p.customdata);
      });
    }
  }

  // figures: [[element id, {data, layout}, clickable?], ...]; clicking a point with a latent id opens its page.
  // An element marked `data-lazy` is drawn only when it comes near the viewport (in a closed <details>, when that
  // opens), so a page of many figures (a compare page of 90 runs) opens at once; drawn figures stay drawn.
  let observer = null;
  const pending = new Map();
  function drawWhenSeen(target, draw) {
    if (!("IntersectionObserver" in window)) { draw(); return; }
    if (!observer) {
      observer = new IntersectionObserver((entries) => {
        for (const entry of entries) {
          if (!entry.isIntersecting || !pending.has(entry.target)) continue;
          const fn = pending.get(entry.target);
          pending.delete(entry.target);
          observer.unobserve(entry.target);
          fn();
        }
      }, { rootMargin: "300px 0px" });
    }
    pending.set(target, draw);
    observer.observe(target);
  }

  function figures(list, latentHref) {
    for (const [id, fig, clickable] of list) {
      const target = document.getElementById(id);
      const open = clickable && latentHref ? (lid) => { window.location.href = latentHref(lid); } : null;
      if (target && target.hasAttribute("data-lazy")) drawWhenSeen(target, () => plot(target, fig, open));
      else plot(target, fig, open);
    }
  }

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = () => { s.remove(); resolve(); };
      s.onerror = () => { s.remove(); reject(new Error("cannot load " + src)); };
      document.head.append(s);
    });
  }

  // ---- index page: a sortable, searchable table of latents --------------------------------------
  function index(doc) {
    figures(doc.figures || [], (id) => "latent.html#" + id);
    const cols = doc.columns, rows = doc.rows, n = cols.length;
    const table = document.getElementById("latents");
    const thead = el("thead"), tbody = el("tbody"), headRow = el("tr");
    const ths = cols.map((c, j) => {
      const th = el("th", { class: c.type === "num" ? "num" : null, title: c.title || null, text: c.label });
      th.addEventListener("click", () => sortBy(j));
      headRow.append(th);
      return th;
    });
    thead.append(headRow);
    const trs = new Array(rows.length);  // row elements, built when first listed
    function rowElement(i) {
      if (trs[i]) return trs[i];
      const r = rows[i];
      const tr = el("tr", { class: r[n] ? "dead" : null });
      cols.forEach((c, j) => {
        const v = r[j];
        if (c.type === "id") {
          tr.append(el("td", {}, el("a", { href: "latent.html#" + v, text: String(v) })));
        } else if (c.type === "num") {
          tr.append(el("td", { class: "num", text: c.key === "density" && r[n] ? "dead" : (c.pct ? pct(v) : fmt(v)) }));
        } else {
          tr.append(el("td", { class: "tokcell", text: v === null ? "" : String(v) }));
        }
      });
      trs[i] = tr;
      return tr;
    }
    // search text per row: id and every text cell, lower-cased
    const hay = rows.map((r) => cols.map((c, j) => (c.type === "num" ? "" : String(r[j] === null ? "" : r[j]))).join("\u0000").toLowerCase());
    const order = rows.map((_, i) => i);
    const match = rows.map(() => true);
    let sortCol = -1, sortDir = 1, limit = PAGE_ROWS;
    table.replaceChildren(thead, tbody);
    const count = document.getElementById("count");
    const search = document.getElementById("search");
    const deadOnly = document.getElementById("dead-filter");
    const more = el("button", { type: "button", text: "list " + PAGE_ROWS + " more" });
    const all = el("button", { type: "button", text: "list all" });
    more.addEventListener("click", () => { limit += PAGE_ROWS; render(); });
    all.addEventListener("click", () => { limit = Infinity; render(); });
    table.after(el("div", { class: "toolbar", id: "more" }, more, all));

    // Only the first `limit` matching rows are in the table: thousands of latents stay quick to sort and filter.
    function render() {
      const listed = order.filter((i) => match[i]);
      const f = document.createDocumentFragment();
      listed.slice(0, limit).forEach((i) => f.append(rowElement(i)));
      tbody.replaceChildren(f);
      count.textContent = listed.length + " of " + rows.length + " latents" +
        (listed.length > limit ? " (first " + limit + " listed)" : "");
      document.getElementById("more").hidden = listed.length <= limit;
    }

    function sortBy(j) {
      sortDir = sortCol === j ? -sortDir : (cols[j].type === "num" ? -1 : 1);
      sortCol = j;
      const key = (i) => rows[i][j];
      order.sort((a, b) => {
        const x = key(a), y = key(b);
        const nx = x === null || x === undefined, ny = y === null || y === undefined;
        if (nx || ny) return nx === ny ? a - b : (nx ? 1 : -1);  // missing values last either way
        if (x < y) return -sortDir;
        if (x > y) return sortDir;
        return a - b;
      });
      ths.forEach((th, k) => th.classList.toggle("asc", k === j && sortDir > 0));
      ths.forEach((th, k) => th.classList.toggle("desc", k === j && sortDir < 0));
      render();
    }

    function filter() {
      const q = search.value.trim().toLowerCase();
      const mode = deadOnly ? deadOnly.value : "all";
      for (let i = 0; i < rows.length; i++) {
        let ok = q === "" || String(rows[i][0]) === q || hay[i].includes(q);
        if (mode === "dead") ok = ok && rows[i][n];
        if (mode === "alive") ok = ok && !rows[i][n];
        match[i] = ok;
      }
      limit = PAGE_ROWS;
      render();
    }
    search.addEventListener("input", filter);
    if (deadOnly) deadOnly.addEventListener("change", filter);
    filter();
  }

  // ---- latent page: one page, its data file loaded per latent id (the address's #id) -------------
  function latentPage() {
    window.addEventListener("hashchange", openFromHash);
    openFromHash();
  }

  function openFromHash() {
    const main = document.getElementById("latent");
    const raw = decodeURIComponent(window.location.hash.slice(1));
    if (!/^[0-9]+$/.test(raw)) {
      main.replaceChildren(el("p", { class: "warn", text: "No latent id in the address: open latent.html#ID, or pick one in the index." }));
      return;
    }
    const id = Number(raw);
    state.wanted = id;
    document.title = "latent " + id;
    main.replaceChildren(el("p", { class: "muted", text: "loading latent " + id + " ..." }));
    loadScript("data/latents/" + id + ".js").catch(() => {
      if (state.wanted === id) main.replaceChildren(el("p", { class: "warn", text: "Latent " + id + " has no page in this dashboard." }));
    });
  }

  function contextRow(entry, scale) {
    const toks = el("span", { class: "toks" });
    entry.t.forEach((tok, i) => {
      const a = entry.a[i];
      const s = el("span", { class: "tok" + (i === entry.m ? " mark" : ""), title: "activation " + fmt(a, 4), text: tok });
      if (a > 0 && scale > 0) s.style.backgroundColor = "rgba(234, 88, 12, " + Math.min(1, 0.08 + 0.92 * a / scale).toFixed(3) + ")";
      toks.append(s);
    });
    return el("div", { class: "ctx" }, el("span", { class: "ctx-val", title: "activation of the marked token", text: fmt(entry.v) }), toks);
  }

  function logitTable(list, cls) {
    const t = el("table", { class: "data" });
    t.append(el("tr", {}, el("th", { text: "token" }), el("th", { class: "num", text: "effect" })));
    for (const [tok, v] of list) t.append(el("tr", {}, el("td", { class: "tokcell", text: tok }), el("td", { class: "num " + cls, text: fmt(v) })));
    return t;
  }

  function latent(doc) {
    if (doc.id !== state.wanted) return;  // a late file of a latent the reader has already left
    const main = document.getElementById("latent");
    const parts = [];
    const nav = el("nav", { class: "top" }, el("a", { href: "index.html", text: "\u2190 index" }));
    if (doc.prev !== null) nav.append(el("a", { href: "#" + doc.prev, text: "\u2039 latent " + doc.prev }));
    if (doc.next !== null) nav.append(el("a", { href: "#" + doc.next, text: "latent " + doc.next + " \u203A" }));
    nav.append(el("span", { class: "muted", text: doc.run }));
    parts.push(nav, el("h1", { text: "Latent " + doc.id }));
    const stats = el("div", { class: "stats" });
    const stat = (label, value, title) => stats.append(el("div", { title: title || null }, el("b", { text: value }), label));
    stat("density", doc.dead ? "dead" : pct(doc.density), doc.count + " firings in " + doc.n_tokens + " tokens");
    stat("firings", String(doc.count));
    stat("max activation", fmt(doc.max));
    stat("mean activation when firing", fmt(doc.mean));
    if (doc.ablation) {
      stat("ablation \u0394CE", fmt(doc.ablation.ce_increase), "mean increase of next-token CE at the positions where the latent fires, when it is removed (vsae eval)");
      stat("ablation KL", fmt(doc.ablation.kl));
    }
    parts.push(stats);
    if (doc.dead) {
      parts.push(el("p", { class: "dead-banner", text: "Dead: this latent never fired on the " + doc.n_tokens + " tokens scanned. It has no contexts or activation histogram." }));
    }
    const grid = el("div", { class: "grid" });
    if (!doc.dead) {
      const h = el("div", {}, el("h3", { text: "Activation histogram" }), el("div", { class: "plot small", id: "hist" }));
      grid.append(h);
    }
    if (doc.logits) {
      const lg = el("div", {}, el("h3", { text: "Logit effects" }), el("p", { class: "note", text: doc.logits.definition }));
      lg.append(el("div", { class: "side" }, el("div", {}, el("b", { text: "positive" }), logitTable(doc.logits.pos, "pos")),
                                            el("div", {}, el("b", { text: "negative" }), logitTable(doc.logits.neg, "neg"))));
      grid.append(lg);
    }
    const nb = el("div", {}, el("h3", { text: "Nearest latents by decoder cosine" }));
    const nt = el("table", { class: "data" }, el("tr", {}, el("th", { text: "latent" }), el("th", { class: "num", text: "cosine" })));
    for (const [id, cos, linked] of doc.neighbours) {
      nt.append(el("tr", {}, el("td", {}, linked ? el("a", { href: "#" + id, text: String(id) }) : el("span", { text: String(id) + " (no page)" })), el("td", { class: "num", text: fmt(cos) })));
    }
    nb.append(nt);
    grid.append(nb);
    if (doc.tsne) grid.append(el("div", {}, el("h3", { text: "Position on the eval t-SNE maps" }), el("div", { class: "plot small", id: "tsne" })));
    parts.push(grid);
    if (!doc.dead) {
      parts.push(el("h2", { text: "Top activating contexts" }),
                 el("p", { class: "note", text: "The " + doc.top.length + " sequences with the highest maximum activation (one per sequence), " + doc.window_note + " The marked token is the maximum; colour is the activation relative to the latent's maximum; hover a token for its value." }));
      for (const e of doc.top) parts.push(contextRow(e, doc.max));
      parts.push(el("h2", { text: "Samples from activation quantiles" }),
                 el("p", { class: "note", text: "A uniform random sample of " + doc.sample_size + " of the latent's firings, cut into bands by its quantiles (highest first); the marked token is the sampled firing." }));
      for (const band of doc.bands.slice().reverse()) {
        parts.push(el("h3", { text: "quantiles " + band.label + " (activations " + fmt(band.lo) + " to " + fmt(band.hi) + ")" }));
        for (const e of band.samples) parts.push(contextRow(e, doc.max));
      }
    }
    main.replaceChildren(...parts);
    window.scrollTo(0, 0);
    if (!doc.dead) {
      const w = doc.hist.top / doc.hist.counts.length;
      const x = doc.hist.counts.map((_, i) => (i + 0.5) * w);
      let last = doc.hist.counts.length - 1;
      while (last > 0 && doc.hist.counts[last] === 0) last--;
      plot(document.getElementById("hist"), {
        data: [{ type: "bar", x: x, y: doc.hist.counts, width: w, marker: { color: "#ea580c" }, hovertemplate: "%{x:.3g}: %{y} firings<extra></extra>" }],
        layout: { margin: { l: 50, r: 10, t: 10, b: 40 }, bargap: 0, xaxis: { title: { text: "activation" }, range: [0, (last + 1) * w] }, yaxis: { title: { text: "firings" } } },
      });
    }
    if (doc.tsne) withTsne((maps) => drawTsne(doc, maps));
  }

  function withTsne(fn) {
    if (state.tsne) { fn(state.tsne); return; }
    state.tsneWaiting.push(fn);
    if (state.tsneWaiting.length === 1) loadScript("data/tsne.js").catch(() => { state.tsneWaiting = []; });
  }

  function tsneMaps(maps) {
    state.tsne = maps;
    const waiting = state.tsneWaiting;
    state.tsneWaiting = [];
    waiting.forEach((fn) => fn(maps));
  }

  function drawTsne(doc, maps) {
    const target = document.getElementById("tsne");
    if (!target || doc.id !== state.wanted) return;
    const data = [];
    const names = Object.keys(doc.tsne);
    names.forEach((name, k) => {
      const m = maps[name];
      if (!m) return;
      const axis = k === 0 ? "" : String(k + 1);
      data.push({ type: "scattergl", mode: "markers", x: m.x, y: m.y, customdata: m.ids, name: name, xaxis: "x" + axis, yaxis: "y" + axis,
                  marker: { size: 3, color: "#c7c7cc" }, hovertemplate: "latent %{customdata}<extra>" + name + "</extra>" });
      const [px, py] = doc.tsne[name];
      data.push({ type: "scatter", mode: "markers", x: [px], y: [py], customdata: [doc.id], name: "latent " + doc.id, xaxis: "x" + axis, yaxis: "y" + axis,
                  marker: { size: 12, color: "#c2410c", line: { width: 1, color: "#000" } }, hovertemplate: "latent %{customdata}<extra></extra>" });
    });
    const layout = { margin: { l: 10, r: 10, t: 24, b: 10 }, showlegend: false, grid: { rows: 1, columns: names.length, pattern: "independent" },
                     annotations: names.map((name, k) => ({ text: name, showarrow: false, xref: (k === 0 ? "x" : "x" + (k + 1)) + " domain", yref: "paper", x: 0.5, y: 1.06 })) };
    names.forEach((_, k) => { const a = k === 0 ? "" : String(k + 1); layout["xaxis" + a] = { visible: false }; layout["yaxis" + a] = { visible: false }; });
    plot(target, { data: data, layout: layout }, (id) => { window.location.hash = "#" + id; });
  }

  return { el, fmt, pct, plot, plotlyReady, plotlyError, figures, index, latentPage, latent, tsneMaps };
})();
"""
