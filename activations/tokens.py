"""Documents -> one deterministic stream of fixed-length token contexts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def pack_contexts(
    documents: Iterable[str],
    tokenizer,
    context: int,
    bos_token_id: int | None = None,
    batch_docs: int = 256,
) -> Iterator[np.ndarray]:
    """Yield int32 arrays of `context` tokens: BOS, then `context - 1` tokens of the stream.

    The stream is the documents' tokens joined by the end-of-text token (as in
    Pythia's training data, where BOS = EOS = `<|endoftext|>`). Every context
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
    buf: list[int] = []
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        nonlocal buf
        # Fast tokenizers encode a list in parallel; one call per batch, not per document.
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buf.extend(ids)
            buf.append(eos)
            while len(buf) >= body:
                yield np.asarray([bos, *buf[:body]], dtype=np.int32)
                buf = buf[body:]
        batch.clear()

    for doc in documents:
        if doc:
            batch.append(doc)
        if len(batch) >= batch_docs:
            yield from flush()
    if batch:
        yield from flush()
