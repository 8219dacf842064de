"""Documents -> one deterministic stream of fixed-length token contexts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def pack_contexts(
    documents: Iterable[str],
    tokenizer,
    context: int,
    bos_token_id: int | None = None,
    batch_chars: int = 1 << 18,
) -> Iterator[np.ndarray]:
    """Yield int32 arrays of `context` tokens: BOS, then `context - 1` tokens of the stream.

    The stream is the documents' tokens joined by the end-of-text token (as in
    Pythia's training data, where BOS = EOS = `<|endoftext|>`); each document
    is tokenized whole, so batching does not change the stream. Every context
    starts with BOS, so a context never depends on where the previous one was
    cut; the same documents and tokenizer always give the same contexts.
    """
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}")
    bos = tokenizer.bos_token_id if bos_token_id is None else bos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    if bos is None:
        raise ValueError("the tokenizer has no BOS token; pass bos_token_id")
    body = context - 1
    carry = np.zeros(0, dtype=np.int32)  # stream tokens not yet in a context
    batch: list[str] = []
    n_chars = 0

    def flush() -> Iterator[np.ndarray]:
        nonlocal carry, n_chars
        # Fast tokenizers encode a list in parallel; one call per batch, not per document.
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        stream = np.fromiter(
            (t for doc in ids for t in (*doc, eos)), dtype=np.int32, count=sum(len(d) + 1 for d in ids)
        )
        stream = np.concatenate([carry, stream])
        n = len(stream) // body
        for row in stream[: n * body].reshape(n, body):
            yield np.concatenate([[bos], row]).astype(np.int32)
        carry = stream[n * body :]
        batch.clear()
        n_chars = 0

    for doc in documents:
        if doc:
            batch.append(doc)
            n_chars += len(doc)
        # Batches of about `batch_chars` characters: the first context comes out
        # quickly even when the corpus is a few huge documents.
        if n_chars >= batch_chars:
            yield from flush()
    if batch:
        yield from flush()
