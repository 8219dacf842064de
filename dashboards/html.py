"""HTML and data-file writing for the dashboards: escaping, the page skeleton, shared assets, file writes.

Escaping rules, in one place:
- text the server writes into HTML goes through `esc` (html.escape, quotes included);
- data for the pages is JSON inside `.js` files or `<script>` blocks, written by `script_json`, which escapes
  `<`, `>`, `&`, U+2028 and U+2029 (so no string can close the script element) and writes non-finite numbers
  as null;
- the pages' JavaScript puts model text into the DOM only as text nodes (`textContent`), never as markup;
- token strings are made visible first by `display_token` (control characters become symbols or escapes);
- text for plotly labels (which understand a little HTML) goes through `plotly_text`.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from pathlib import Path

from dashboards.assets import CSS, JS

ASSETS = "assets"
PLOTLY_JS = "plotly.min.js"
# Visible stand-ins for whitespace that would vanish or break a context line.
VISIBLE = {"\n": "\u21b5", "\r": "\u240d", "\t": "\u21e5"}
# Characters that reorder or hide text around them (bidi overrides, zero-width marks): shown as escapes.
INVISIBLE = {0x200B, 0x200C, 0x200D, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2060, 0x2066,
             0x2067, 0x2068, 0x2069, 0xFEFF}


def esc(value) -> str:
    """`value` as HTML text (safe in element content and in quoted attribute values)."""
    return html.escape(str(value), quote=True)


def display_token(text: str) -> str:
    """A token's text with control and invisible characters shown: newline as a return arrow, tab as a tab arrow,
    other C0 controls as the Unicode control pictures, DEL, C1 controls and bidi/zero-width marks as \\x.. or
    \\u.... escapes."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in VISIBLE:
            out.append(VISIBLE[ch])
        elif code < 0x20:
            out.append(chr(0x2400 + code))
        elif code == 0x7F:
            out.append("\u2421")
        elif 0x80 <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif code in INVISIBLE or 0xD800 <= code < 0xE000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def plotly_text(text: str) -> str:
    """Text for a plotly title, legend or axis label: plotly reads a subset of HTML there (tags and the entities
    &lt; &gt; &amp;, but not &quot;), so escape <, > and &."""
    return html.escape(str(text), quote=False)


def finite(obj):
    """`obj` with NaN and infinities replaced by None (JSON has no such numbers), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def script_json(obj) -> str:
    """JSON that is also safe inside an HTML <script> element and in a .js file."""
    text = json.dumps(finite(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def data_script(function: str, obj) -> str:
    """A data file's JavaScript: one call `VSAE.<function>(<json>)`."""
    return f"VSAE.{function}({script_json(obj)});\n"


def figure_data(fig) -> dict:
    """A plotly figure as plain JSON data ({data, layout}) for `VSAE.plot` in the page."""
    return finite(json.loads(fig.to_json()))


def generator_meta(generator: str) -> str:
    """The `<meta name="generator">` line that marks a page as vsae's (`vsae compare` checks it before replacing
    a file)."""
    return f'<meta name="generator" content="{esc(generator)}">'


def page(title: str, body: str, *, scripts: tuple[str, ...] = (), inline: tuple[str, ...] = (),
         css: str | None = None, plotly_src: str | None = None, generator: str | None = None) -> str:
    """A whole HTML document. `scripts` are relative src paths; `inline` are script texts (data or code) placed
    after them, each already safe for a <script> element; `css` inlines the stylesheet instead of linking it;
    `plotly_src` loads plotly.js last and asynchronously (the page script draws its plots once it is there);
    `generator` marks the page as written by that vsae command (`generator_meta`)."""
    meta = f"{generator_meta(generator)}\n" if generator else ""
    style = f"<style>{css}</style>" if css is not None else f'<link rel="stylesheet" href="{ASSETS}/vsae.css">'
    srcs = "".join(f'<script src="{esc(s)}"></script>\n' for s in scripts)
    codes = "".join(f"<script>{s}</script>\n" for s in inline)
    if plotly_src:
        codes += (f'<script src="{esc(plotly_src)}" async onload="VSAE.plotlyReady()" '
                  f'onerror="VSAE.plotlyError()"></script>\n')
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n{meta}'
            f"<title>{esc(title)}</title>\n{style}\n</head>\n<body>\n{body}\n{srcs}{codes}</body>\n</html>\n")


def write_text(path: Path, text: str) -> None:
    """Write a page or data file into a dashboard being built, making its directory if needed. A plain write: the
    directory is new and swapped in whole once complete (`vsae.outputs.replace_dir`, which syncs every file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def plotly_source() -> Path:
    """The plotly.js bundle shipped with the plotly package (used offline; no CDN)."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the plotly package has no bundled plotly.min.js")
    return path


def install_assets(out: Path) -> None:
    """Write the shared assets beside the pages of a dashboard being built: plotly.js, the stylesheet and the page
    script."""
    assets = out / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plotly_source(), assets / PLOTLY_JS)
    write_text(assets / "vsae.css", CSS)
    write_text(assets / "vsae.js", JS)


PAGE_SCRIPT = f"{ASSETS}/vsae.js"
PLOTLY_SRC = f"{ASSETS}/{PLOTLY_JS}"


def inline_assets() -> tuple[str, ...]:
    """plotly.js and the page script as inline script texts (for a single-file page)."""
    plotly_js = plotly_source().read_text(encoding="utf-8")
    if "</script" in plotly_js.lower():
        raise ValueError("plotly.min.js contains '</script' and cannot be inlined")
    return (plotly_js, JS)


def table(rows: list[list[str]], head: list[str] | None = None, cls: str = "kv") -> str:
    """An HTML table of already-escaped cell strings."""
    thead = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{thead}{body}</table>'


def fmt(value, digits: int = 4) -> str:
    """A number for a table cell (already safe HTML): 4 significant digits, n/a for missing or non-finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return esc(value)
