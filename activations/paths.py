"""Where vsae keeps what it downloads or builds (corpora, the embedded model)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """vsae's cache dir: `$VSAE_CACHE_DIR`, else `$XDG_CACHE_HOME/vsae`, else `~/.cache/vsae`."""
    env = os.environ.get("VSAE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vsae"
