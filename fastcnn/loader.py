"""A prefetching loader: one thread forms the next mini-batches while the current one
trains, as the seed notes put it.

`PrefetchLoader(source, device)` wraps a torch.utils.data.DataLoader or any iterable of
batches (a tensor, or tuples / lists / dicts of tensors). A background thread pulls up
to `prefetch` batches ahead from the source and moves them to `device`: on a CUDA
target each batch is first copied to pinned host memory and then sent with a
non-blocking copy on a side stream, which the consuming stream waits for; on the CPU
the copy is a no-op. Order and content are the source's. An exception raised by the
source (or by the copy) is re-raised in the consumer, and breaking out of the loop,
close(), or dropping the iterator stops the thread: it stops as soon as the batch the
source is producing at that moment is done (a blocked queue never holds it up), so
close() waits at most one source batch; a source that never returns would keep it
waiting (the thread is a daemon: it does not keep the interpreter alive).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["PrefetchLoader", "move_batch"]

# How often a blocked worker looks at the stop flag: bounds how long close() waits.
_POLL_S = 0.05


def move_batch(batch: Any, device: torch.device, pin_memory: bool = False, non_blocking: bool = False) -> Any:
    """`batch` with every tensor inside (tuples, lists, dicts, nested) moved to `device`;
    other values are kept as they are."""
    if isinstance(batch, torch.Tensor):
        if pin_memory and batch.device.type == "cpu" and not batch.is_pinned():
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(move_batch(b, device, pin_memory, non_blocking) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(b, device, pin_memory, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: move_batch(v, device, pin_memory, non_blocking) for k, v in batch.items()}
    return batch


def _record_stream(batch: Any, stream) -> None:
    """Tells the caching allocator that `stream` uses the batch's CUDA memory, which was
    allocated on the copy stream, so it is not reused before `stream` is done with it."""
    if isinstance(batch, torch.Tensor):
        if batch.device.type == "cuda":
            batch.record_stream(stream)
    elif isinstance(batch, (list, tuple)):
        for b in batch:
            _record_stream(b, stream)
    elif isinstance(batch, dict):
        for b in batch.values():
            _record_stream(b, stream)


class PrefetchLoader:
    """Iterates `source`, with up to `prefetch` batches prepared ahead on `device` by a
    background thread. `device=None` keeps the batches where they are; `pin_memory`
    defaults to True for a CUDA device. len() is the source's."""

    def __init__(self, source: Iterable, device: torch.device | str | None = None, prefetch: int = 2,
                 pin_memory: bool | None = None):
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be a positive int, got {prefetch!r}")
        if not isinstance(source, Iterable):
            raise TypeError(f"source must be an iterable of batches, got {type(source).__name__}")
        self.source = source
        self.device = torch.device(device) if device is not None else None
        self.prefetch = prefetch
        cuda_target = self.device is not None and self.device.type == "cuda"
        self.pin_memory = cuda_target if pin_memory is None else bool(pin_memory)

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> _PrefetchIterator:
        return _PrefetchIterator(self)

    def __repr__(self) -> str:
        return f"PrefetchLoader(device={self.device}, prefetch={self.prefetch}, pin_memory={self.pin_memory})"


class _End:
    """Put on the queue after the last batch."""


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _PrefetchIterator(Iterator):
    def __init__(self, loader: PrefetchLoader):
        self._queue: queue.Queue = queue.Queue(maxsize=loader.prefetch)
        self._stop = threading.Event()
        self._done = False
        device = self._device = loader.device
        self._copy_stream = None
        if device is not None and device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(device)
        # The thread gets no reference to self, so dropping the iterator closes it.
        self._thread = threading.Thread(
            target=_produce, name="fastcnn-prefetch", daemon=True,
            args=(iter(loader.source), self._queue, self._stop, device, loader.pin_memory, self._copy_stream))
        self._thread.start()

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        batch, event = item
        if event is not None:
            stream = torch.cuda.current_stream(self._device)
            stream.wait_event(event)
            _record_stream(batch, stream)
        return batch

    def close(self) -> None:
        """Stops the worker thread and waits for it (at most until the source returns the
        batch it is producing); idempotent."""
        if self._done:
            return
        self._done = True
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a worker waiting for room in the queue
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(_POLL_S)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Puts `item`, waiting for room unless asked to stop; False if stopped."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _produce(source: Iterator, q: queue.Queue, stop: threading.Event, device, pin_memory: bool, copy_stream) -> None:
    try:
        while not stop.is_set():
            try:
                batch = next(source)
            except StopIteration:
                _put(q, _End(), stop)
                return
            event = None
            if device is not None:
                if copy_stream is not None:
                    with torch.cuda.stream(copy_stream):
                        batch = move_batch(batch, device, pin_memory, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(copy_stream)
                else:
                    batch = move_batch(batch, device, pin_memory)
            if not _put(q, (batch, event), stop):
                return
    except BaseException as error:  # re-raised in the consumer
        _put(q, _Failure(error), stop)
    finally:
        close = getattr(source, "close", None)
        if stop.is_set() and callable(close):
            try:  # a generator source: run its finally blocks now, in this thread
                close()
            except Exception:
                pass
