"""Per-latent pages: one shell page (`latent.html#ID`) and one small data file per latent, loaded when opened.

`latent_documents` turns the gathered statistics into one JSON document per latent (no I/O); `write_latent_pages`
writes the shell page and the data files `data/latents/ID.js`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dashboards.gather import LatentStats, quantile_bands
from dashboards.html import PAGE_SCRIPT, PLOTLY_SRC, data_script, display_token, page, write_text
from dashboards.weights import LOGIT_EFFECT_DEFINITION

LATENT_PAGE = "latent.html"
LATENT_DIR = "data/latents"


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (bytes_to_unicode), inverted: symbol -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, symbols, strict=True)}


BYTE_DECODER = _byte_decoder()


class TokenText:
    """Display strings of token ids, cached per id, control characters made visible (`display_token`).

    A byte-level BPE token (GPT-2, Pythia) is shown from its own bytes: a piece of a multi-byte character shows as
    \\x.. escapes instead of the replacement character that decoding it alone would give. Other tokenizers decode
    each token alone. Without a tokenizer a token shows as #id.
    """

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._cache: dict[int, str] = {}

    def _raw(self, i: int) -> str:
        if self.tokenizer is None:
            return f"#{i} "
        if self._byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(i)
            if isinstance(piece, str) and piece and all(ch in BYTE_DECODER for ch in piece):
                return bytes(BYTE_DECODER[ch] for ch in piece).decode("utf-8", errors="backslashreplace")
        return self.tokenizer.decode([i])

    def __call__(self, ids) -> list[str]:
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            text = self._cache.get(i)
            if text is None:
                text = self._cache[i] = display_token(self._raw(i))
            out.append(text)
        return out


@dataclass
class LatentExtras:
    """What the pages show beyond the gathered statistics, aligned with `LatentStats.latents` where per latent."""

    run_name: str
    neighbour_cos: torch.Tensor  # [L, n]
    neighbour_ids: torch.Tensor  # [L, n]
    logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # from `logit_effects`
    ablation: dict[int, dict] | None = None  # latent id -> eval.json's ablation entry
    tsne: dict[str, dict[int, tuple[float, float]]] | None = None  # map name -> latent id -> (x, y)
    n_bands: int = 5
    per_band: int = 4


def _rounded(values: np.ndarray, scale: float) -> list:
    """Activations to 4 significant digits relative to `scale` (the latent's max); exact zeros as 0."""
    decimals = 3 - int(np.floor(np.log10(scale))) if scale > 0 else 3
    r = np.round(values.astype(np.float64), max(decimals, 0))
    return [0 if v == 0 else v for v in r.tolist()]


def _contexts(rows: np.ndarray, starts: np.ndarray, values: np.ndarray, windows: np.ndarray, token_ids: np.ndarray,
              text: Callable, scale: float) -> list[dict]:
    """One entry per context: v (value of the marked token), m (its index), t (token strings), a (activations)."""
    out = []
    width = windows.shape[-1]
    for row, start, value, window in zip(rows.tolist(), starts.tolist(), values.tolist(), windows, strict=True):
        if row < 0:
            continue
        out.append({"v": round(value, 6), "m": row - start, "t": text(token_ids[start : start + width]),
                    "a": _rounded(window, scale)})
    return out


def latent_documents(stats: LatentStats, token_ids: np.ndarray, text: Callable, extras: LatentExtras,
                     has_page: set[int]) -> Iterator[dict]:
    """One JSON-able document per latent of `stats`, in order (see `VSAE.latent` in dashboards/assets.py)."""
    ids = stats.latents.tolist()
    density = stats.density.tolist()
    count, act_sum, act_max = stats.count.tolist(), stats.act_sum.tolist(), stats.act_max.tolist()
    if extras.logits is not None:
        top_v, top_i, bot_v, bot_i = (t.tolist() for t in extras.logits)
    window_note = (f"each a window of {stats.window} tokens around the marked token, within its context.")
    for p, lid in enumerate(ids):
        doc = {
            "id": lid, "run": extras.run_name, "prev": ids[p - 1] if p > 0 else None,
            "next": ids[p + 1] if p + 1 < len(ids) else None, "n_tokens": stats.n_tokens, "count": count[p],
            "density": density[p], "dead": count[p] == 0, "max": act_max[p],
            "mean": act_sum[p] / count[p] if count[p] else None, "window_note": window_note,
            "neighbours": [[int(j), round(float(c), 4), int(j) in has_page]
                           for c, j in zip(extras.neighbour_cos[p].tolist(), extras.neighbour_ids[p].tolist(),
                                           strict=True)],
            "ablation": (extras.ablation or {}).get(lid),
            "logits": None, "tsne": None, "top": [], "bands": [], "sample_size": 0,
        }
        if extras.logits is not None:
            doc["logits"] = {"definition": LOGIT_EFFECT_DEFINITION,
                             "pos": [[t, round(v, 4)] for t, v in zip(text(top_i[p]), top_v[p], strict=True)],
                             "neg": [[t, round(v, 4)] for t, v in zip(text(bot_i[p]), bot_v[p], strict=True)]}
        if extras.tsne:
            where = {name: m[lid] for name, m in extras.tsne.items() if lid in m}
            doc["tsne"] = where or None
        if count[p]:
            scale = act_max[p]
            doc["hist"] = {"top": float(stats.hist_top[p]), "counts": stats.hist_counts[p].tolist()}
            doc["top"] = _contexts(stats.top_row[p].numpy(), stats.top_start[p].numpy(), stats.top_value[p].numpy(),
                                   stats.top_window[p].numpy(), token_ids, text, scale)
            kept = (stats.sample_row[p] >= 0).numpy()
            rows, starts = stats.sample_row[p].numpy()[kept], stats.sample_start[p].numpy()[kept]
            values, windows = stats.sample_value[p].numpy()[kept], stats.sample_window[p].numpy()[kept]
            doc["sample_size"] = int(kept.sum())
            n_bands = extras.n_bands
            for b, group in enumerate(quantile_bands(values, n_bands)):
                if group.size == 0:
                    continue
                shown = group[: extras.per_band]
                doc["bands"].append({
                    "label": f"{100 * b // n_bands}-{100 * (b + 1) // n_bands}%",
                    "lo": float(values[group].min()), "hi": float(values[group].max()),
                    "samples": _contexts(rows[shown], starts[shown], values[shown], windows[shown], token_ids, text,
                                         scale),
                })
        yield doc


def latent_shell(title: str) -> str:
    body = '<main id="latent"><p class="muted">loading ...</p></main>'
    return page(title, body, scripts=(PAGE_SCRIPT,), inline=("VSAE.latentPage();",), plotly_src=PLOTLY_SRC)


def write_latent_page(out: Path, doc: dict) -> None:
    write_text(out / LATENT_DIR / f"{doc['id']}.js", data_script("latent", doc))


def write_latent_shell(out: Path, run_name: str) -> None:
    write_text(out / LATENT_PAGE, latent_shell(f"{run_name}: latent"))
