"""Search over the served runs' latents: by id, and by token, through what each latent is known for.

A latent matches a token when the token is among
- the top tokens of its logit effects (`dashboards.weights.logit_effects`: what it promotes), or
- the tokens at the maximum of its dashboard's top activating contexts (what it fires on: the dashboard index's
  "top tokens" column), when its run is served with a dashboard.
Tokens compare by their display text with surrounding whitespace removed and case folded, so "dog" finds " Dog".
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from dashboards.index_page import INDEX_DATA

TOKEN_SEPARATOR = " \u00b7 "  # how the index's top-tokens column joins its tokens (`index_page.index_row`)


def token_key(text: str) -> str:
    """The form in which tokens and queries are compared."""
    return text.strip().casefold()


@dataclass
class SearchIndex:
    """Per token key, the (run, latent) pairs that mention it, with why."""

    d_sae: dict[str, int] = field(default_factory=dict)  # run -> its number of latents (for search by id)
    by_token: dict[str, list[tuple[str, int, str, float]]] = field(default_factory=lambda: defaultdict(list))

    def add_logit_tokens(self, run: str, top_tokens: list[list[str]], top_values: list[list[float]]) -> None:
        """Latent i of `run` promotes top_tokens[i] (largest logit effect first)."""
        for latent, (tokens, values) in enumerate(zip(top_tokens, top_values, strict=True)):
            for rank, (tok, value) in enumerate(zip(tokens, values, strict=True)):
                # Earlier ranks weigh more; a logit match ranks below any context match (weights < 1).
                self.by_token[token_key(tok)].append(
                    (run, latent, f"logit effect #{rank + 1} ({value:+.3g})", 0.5 / (rank + 1)))

    def add_context_tokens(self, run: str, top_tokens: dict[int, list[str]]) -> None:
        """Latent i of `run` fires most on top_tokens[i] (most frequent first)."""
        for latent, tokens in top_tokens.items():
            for rank, tok in enumerate(tokens):
                self.by_token[token_key(tok)].append(
                    (run, latent, f"top contexts' token #{rank + 1}", 2.0 / (rank + 1)))

    def search(self, query: str, limit: int) -> list[dict]:
        """Hits for `query`, best first: {run, latent, why: [...]}; an integer query also finds that latent id in
        every run that has it."""
        hits: dict[tuple[str, int], dict] = {}
        if re.fullmatch(r"\s*\d+\s*", query):
            latent = int(query)
            for run, d_sae in self.d_sae.items():
                if latent < d_sae:
                    hits[(run, latent)] = {"run": run, "latent": latent, "why": ["latent id"], "score": 100.0}
        for run, latent, why, score in self.by_token.get(token_key(query), ()):
            hit = hits.setdefault((run, latent), {"run": run, "latent": latent, "why": [], "score": 0.0})
            hit["why"].append(why)
            hit["score"] += score
        ranked = sorted(hits.values(), key=lambda h: (-h["score"], h["run"], h["latent"]))
        return [{k: v for k, v in h.items() if k != "score"} for h in ranked[:limit]]


def dashboard_top_tokens(dashboard: Path) -> dict[int, list[str]]:
    """latent id -> the tokens of the dashboard index's top-tokens column (empty when the index cannot be read)."""
    try:
        text = (Path(dashboard) / INDEX_DATA).read_text(encoding="utf-8")
        m = re.fullmatch(r"VSAE\.index\((.*)\);\s*", text, re.S)
        doc = json.loads(m.group(1)) if m else {}
        keys = [c.get("key") for c in doc.get("columns", [])]
        col_id, col_tokens = keys.index("id"), keys.index("top_tokens")
    except (OSError, ValueError, AttributeError):
        return {}
    out = {}
    for row in doc.get("rows", []):
        if isinstance(row, list) and len(row) > max(col_id, col_tokens) and isinstance(row[col_tokens], str):
            tokens = [t for t in row[col_tokens].split(TOKEN_SEPARATOR) if t.strip()]
            if tokens:
                out[int(row[col_id])] = tokens
    return out
