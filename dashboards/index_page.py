"""The dashboard's index page: a run summary (config, metrics, density histogram, eval figures) and a sortable,
searchable table of the latents, each row linking to the latent's page.

The table rows and figures live in `data/index.js` (JSON, rendered by `VSAE.index` as text nodes); the summary is
written into the page here, every value through `esc`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dashboards.html import PAGE_SCRIPT, PLOTLY_SRC, data_script, esc, fmt, page, table, write_text
from dashboards.run_info import flat_scalars

INDEX_PAGE = "index.html"
INDEX_DATA = "data/index.js"
COLUMNS = [
    {"key": "id", "label": "latent", "type": "id"},
    {"key": "density", "label": "density", "type": "num", "pct": True,
     "title": "fraction of scanned tokens it fires on"},
    {"key": "max", "label": "max act", "type": "num"},
    {"key": "mean", "label": "mean act", "type": "num", "title": "mean activation when firing"},
    {"key": "top_tokens", "label": "top tokens", "type": "text",
     "title": "most frequent tokens at the maximum of its top contexts"},
    {"key": "top_logits", "label": "top logits", "type": "text", "title": "tokens with the largest logit effect"},
    {"key": "ablation", "label": "ablation \u0394CE", "type": "num",
     "title": "mean CE increase where the latent fires, when it is ablated (vsae eval --metrics ablation)"},
]


def index_row(doc: dict, n_tokens: int = 3) -> list:
    """A table row from a latent's document: the COLUMNS' values, then the dead flag."""
    marked = [e["t"][e["m"]] for e in doc["top"]]
    top_tokens = " \u00b7 ".join(t for t, _ in Counter(marked).most_common(n_tokens))
    logits = " \u00b7 ".join(t for t, _ in doc["logits"]["pos"][:n_tokens]) if doc["logits"] else None
    ablation = doc["ablation"].get("ce_increase") if doc["ablation"] else None
    return [doc["id"], doc["density"], doc["max"] if not doc["dead"] else None, doc["mean"], top_tokens, logits,
            ablation, doc["dead"]]


def summary_html(info: dict, details: dict | None = None) -> str:
    """The run summary: `info` holds sections name -> dict of scalars (already read from disk); `details` is
    shown folded (e.g. the full configuration)."""
    def section(name: str, values: dict) -> str:
        rows = [[esc(k), fmt(v)] for k, v in flat_scalars(values)]
        return f"<div><h3>{esc(name)}</h3>{table(rows)}</div>"

    html = '<div class="grid">' + "".join(section(k, v) for k, v in info.items() if v) + "</div>"
    for name, values in (details or {}).items():
        if values:
            html += f"<details><summary>{esc(name)}</summary>{section('', values)}</details>"
    return html


def index_html(title: str, summary: str, notices: list[str], links: list[tuple[str, str]],
               figure_ids: list[str]) -> str:
    notice = "".join(f'<p class="warn">{esc(n)}</p>' for n in notices)
    link_html = ""
    if links:
        link_html = "<h3>Eval figures</h3><ul>" + "".join(
            f'<li><a href="{esc(href)}">{esc(label)}</a></li>' for label, href in links) + "</ul>"
    plots = "".join(f'<div class="plot" id="{esc(i)}"></div>' for i in figure_ids)
    body = f"""<h1>{esc(title)}</h1>
{notice}
<h2>Run</h2>
{summary}
<div class="grid">{plots}</div>
{link_html}
<h2>Latents</h2>
<div class="toolbar">
  <input id="search" type="search" placeholder="search: latent id or token text" aria-label="search latents">
  <select id="dead-filter" aria-label="dead or alive"><option value="all">all</option>
    <option value="alive">alive only</option><option value="dead">dead only</option></select>
  <span id="count" class="muted"></span>
  <span class="muted">click a column to sort</span>
</div>
<table id="latents" class="data sortable"></table>"""
    return page(title, body, scripts=(PAGE_SCRIPT, INDEX_DATA), plotly_src=PLOTLY_SRC)


def write_index(out: Path, title: str, summary: str, rows: list[list], figures: list, notices: list[str],
                links: list[tuple[str, str]]) -> None:
    """index.html and data/index.js. `figures`: [[element id, figure data, clickable], ...]."""
    write_text(out / INDEX_DATA, data_script("index", {"columns": COLUMNS, "rows": rows, "figures": figures}))
    write_text(out / INDEX_PAGE, index_html(title, summary, notices, links, [f[0] for f in figures]))
