"""Writing plotly figures as self-contained HTML (no CDN: they open offline from disk)."""

from __future__ import annotations

from pathlib import Path

from activations.atomic import write_atomic


def write_figure(fig, path: str | Path) -> Path:
    """Write `fig` as one HTML file with plotly.js inlined, atomically."""
    return write_atomic(path, lambda tmp: fig.write_html(str(tmp), include_plotlyjs=True, full_html=True))
