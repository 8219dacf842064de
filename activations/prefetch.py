"""Run an iterator in a background thread, a few items ahead of its consumer."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def background(items: Iterable[T], depth: int = 2, name: str = "vsae-prefetch") -> Iterator[T]:
    """Yield `items` in order while a daemon thread produces up to `depth` of them ahead.

    Exceptions in the producer are re-raised in the consumer; closing the
    generator early (break, garbage collection) stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # surfaced in the consumer, not lost in the thread
            put(_Raised(e))

    thread = threading.Thread(target=produce, daemon=True, name=name)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
