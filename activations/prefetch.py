"""Run an iterator in a background thread, or a function over items in worker threads, ahead of the consumer."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
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


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int = 2, depth: int = 2,
                name: str = "vsae-gather") -> Iterator[R]:
    """Yield fn(item) for each item, in the items' order, computed by `threads` worker threads.

    At most `depth` + `threads` results are in flight ahead of the consumer (numpy gathers and copies release the
    GIL, so the workers run in parallel). Exceptions in `fn` are re-raised in the consumer; closing the
    generator early cancels what has not started and waits for what has.
    """
    ahead = max(1, depth) + max(1, threads)
    pending: deque[Future] = deque()
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix=name)
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
