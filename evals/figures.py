"""Writing plotly figures as self-contained HTML (no CDN: they open offline from disk)."""

from __future__ import annotations

import os
from pathlib import Path


def write_figure(fig, path: str | Path) -> Path:
    """Write `fig` as one HTML file with plotly.js inlined, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)
    os.replace(tmp, path)
    return path
