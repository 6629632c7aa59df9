"""Background downloads of a remote store's shards into its ShardCache, ahead of the reads that need them.

Bounded on both sides: a few downloads run at once (`threads`) and few more wait (`max_pending`); a request
beyond that is dropped, and the read that needs the shard downloads it on demand as it would have anyway. A
download is the cache's own fetch, so it is checked against the shard's mark and appears by atomic rename, and
the cache's download lock keeps another thread or process from fetching the same shard meanwhile.

A failed download is kept, not printed: the read that needs the shard takes it from `claim` and raises the
same one-line StoreError it would have raised downloading the shard itself.

The threads are the module's own rather than a ThreadPoolExecutor's: when a program ends without closing its
reader (an error, Ctrl-C), an executor's threads would first run every download still queued. These see that
the main thread has ended and leave the queue undone; only the downloads already running finish.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

# A few downloads at once fill a link without starving the foreground reads of bandwidth; the waiting ones are
# at most a window's shards (distill.order blocks), whose sizes the caller already fitted into the cache.
PREFETCH_THREADS = 3
MAX_PENDING = 64
_IDLE_POLL_S = 0.2  # how soon an idle thread notices that the program or its reader has ended


class ShardPrefetcher:
    """Downloads in flight, by cache file, run by a few threads started on first use."""

    def __init__(self, threads: int = PREFETCH_THREADS, max_pending: int = MAX_PENDING) -> None:
        self.threads, self.max_pending = threads, max_pending
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # never longer than max_pending: see start
        self._workers: list[threading.Thread] = []
        self._inflight: dict[Path, Future] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self, target: Path, fetch: Callable[[], Path]) -> bool:
        """Run `fetch` (which downloads `target`) in the background, unless it already runs or too many wait."""
        with self._lock:
            if self._closed or target in self._inflight or len(self._inflight) >= self.max_pending:
                return False
            future: Future = Future()
            self._inflight[target] = future
            self._queue.put((target, future, fetch))
            if len(self._workers) < self.threads:
                worker = threading.Thread(target=self._work, name=f"dsmd-prefetch-{len(self._workers)}")
                self._workers.append(worker)
                worker.start()
        return True

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=_IDLE_POLL_S)
            except queue.Empty:
                if self._closed or not threading.main_thread().is_alive():
                    return
                continue
            if item is None or not threading.main_thread().is_alive():
                return
            target, future, fetch = item
            if not future.set_running_or_notify_cancel():
                continue  # a reader withdrew it to fetch the shard itself
            try:
                future.set_result(fetch())
            except BaseException as exc:  # kept for the read that needs the shard (claim)
                future.set_exception(exc)
            else:
                with self._lock:  # in the cache now: nothing left to claim
                    if self._inflight.get(target) is future:
                        del self._inflight[target]

    def claim(self, target: Path) -> Future | None:
        """The background download of `target` (waiting, running, failed or just finished), taken over by its
        reader: it cancels one still waiting, waits for one running."""
        with self._lock:
            return self._inflight.pop(target, None)

    def pending(self) -> int:
        with self._lock:
            return len(self._inflight)

    def close(self) -> None:
        """Drop what has not started and wait for the running downloads (each leaves a whole file or none)."""
        with self._lock:
            self._closed = True
            for future in self._inflight.values():
                future.cancel()
            self._inflight.clear()
            workers, self._workers = self._workers, []
        for _ in workers:
            self._queue.put(None)
        for worker in workers:
            worker.join()
