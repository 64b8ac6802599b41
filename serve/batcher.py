"""Micro-batching: many concurrent callers, one batched call.

`MicroBatcher` owns a background worker thread. `submit(item)` queues an item and returns a
`concurrent.futures.Future`; the worker takes the first waiting item, keeps collecting for up to `max_wait_s`
or until `max_batch` items are queued, calls `fn(items)` once and resolves every item's future with its
result. With `adaptive` (the default) the worker skips the wait when nothing else is queued and its last
batch held a single item: at low load a lone request pays no batching delay, while under load requests queue
up during each call and the wait fills the next batch. Any failure of a batch (an exception from `fn` or from
`on_batch`, even a BaseException such as SystemExit) fails every future of that batch at once and the worker
keeps running, so one bad batch never stops the service nor leaves a caller waiting for its timeout.

`submit_async(item)`, called on an event loop, returns an `asyncio.Future` instead: the worker resolves all
of a batch's asyncio futures with one `call_soon_threadsafe` per loop, so an event loop serving many
requests is woken once per batch rather than once per request (and no `concurrent.futures.Future` is
wrapped for each). Cancelled futures of either kind (callers that gave up) are dropped before the call.

The server uses it to turn concurrent `/v1/topk` requests into one user-tower call and one index search.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Any, Callable, Sequence

log = logging.getLogger("twotower.serve")

_STOP = object()


class BatcherClosed(RuntimeError):
    """`submit` was called after `close`."""


class MicroBatcher:
    """Collects concurrent submissions into batches for one callable.

    Args:
      fn: called with a list of up to `max_batch` submitted items; must return a sequence of the same length
        (result i resolves the future of item i).
      max_batch: the most items per call.
      max_wait_s: how long the worker waits for more items after the first one of a batch arrives.
      on_batch: optional callback receiving each batch's size (for metrics).
      adaptive: skip the wait at low load (see the module docstring).
    """

    def __init__(self, fn: Callable[[list], Sequence[Any]], *, max_batch: int = 128, max_wait_s: float = 0.002,
                 on_batch: Callable[[int], None] | None = None, adaptive: bool = True,
                 name: str = "micro-batcher"):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self._fn, self.max_batch, self.max_wait_s, self._on_batch = fn, max_batch, max_wait_s, on_batch
        self._queue: queue.Queue = queue.Queue()
        self._closed, self.adaptive, self._last_size = False, adaptive, 1
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    def submit(self, item) -> concurrent.futures.Future:
        """Queues `item`; the returned future resolves to `fn`'s result for it (or its exception)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._put(item, future)
        return future

    def submit_async(self, item) -> asyncio.Future:
        """`submit` for a coroutine on the running event loop: the returned asyncio future resolves (on that
        loop) to `fn`'s result for `item`. Cancelling it drops the item if its batch has not started."""
        future = asyncio.get_running_loop().create_future()
        self._put(item, future)
        return future

    def _put(self, item, future) -> None:
        if self._closed:
            raise BatcherClosed("the batcher is closed; the server is shutting down")
        self._queue.put((item, future))

    def close(self, timeout: float = 5.0) -> None:
        """Stops the worker after the items already queued are answered."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._worker.join(timeout)

    def _collect(self, first) -> tuple[list, bool]:
        """The batch that starts with `first`, and whether a stop marker was met."""
        idle = self.adaptive and self._last_size <= 1 and self._queue.empty()
        batch, deadline = [first], time.perf_counter() + (0.0 if idle else self.max_wait_s)
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._collect(first)
            self._last_size = len(batch)
            # Callers that gave up (cancelled futures) are dropped before the expensive call.
            live = [(item, fut) for item, fut in batch if _start(fut)]
            if live:
                _deliver([fut for _, fut in live], self._call([item for item, _ in live]))

    def _call(self, items: list) -> Sequence[Any]:
        """`fn`'s results for one batch, or its failure once per item: never raises, so the worker survives."""
        try:
            if self._on_batch is not None:
                self._on_batch(len(items))
            results = self._fn(items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            return results
        except BaseException as e:  # noqa: BLE001 - fail this batch's callers, keep serving the next one
            log.exception("batched call failed for %d items", len(items))
            return [e] * len(items)


def _start(future) -> bool:
    """Marks a future as running; False when its caller already cancelled it."""
    if isinstance(future, asyncio.Future):
        return not future.done()   # read off-loop: a cancel racing with this is caught again in _resolve
    return future.set_running_or_notify_cancel()


def _deliver(futures: list, results: Sequence[Any]) -> None:
    """Resolves each future with its result (an exception instance fails it); asyncio futures in one
    callback per event loop."""
    by_loop: dict = {}
    for fut, result in zip(futures, map(_as_failure, results)):
        if isinstance(fut, asyncio.Future):
            by_loop.setdefault(fut.get_loop(), []).append((fut, result))
        elif isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, pairs)
        except RuntimeError:   # the loop was closed: nobody is waiting any more
            pass


def _as_failure(result):
    """`result`, unless it is an exception a caller should not receive as is: an asyncio future refuses to
    hold StopIteration (it would leave every later future of the batch unresolved), and a BaseException
    such as SystemExit would stop the caller's event loop. Those become a RuntimeError naming them."""
    if isinstance(result, BaseException) and (isinstance(result, StopIteration) or
                                              not isinstance(result, Exception)):
        failure = RuntimeError(f"the batch failed: {type(result).__name__}: {result}")
        failure.__cause__ = result
        return failure
    return result


def _resolve(pairs: list) -> None:
    for fut, result in pairs:
        if fut.done():   # cancelled (e.g. timed out) after its batch started
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
