"""Background downloads of a remote store's shards into its ShardCache, ahead of the reads that need them.

Bounded on both sides: a few downloads run at once (`threads`) and few more wait (`max_pending`); a request
beyond that is dropped, and the read that needs the shard downloads it on demand as it would have anyway. A
download is the cache's own fetch, so it is checked against the shard's mark and appears by atomic rename, and
the cache's download lock keeps another thread or process from fetching the same shard meanwhile.

A failed download is kept, not printed: the read that needs the shard takes it from `claim` and raises the
same one-line StoreError it would have raised downloading the shard itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

# A few downloads at once fill a link without starving the foreground reads of bandwidth; the waiting ones are
# at most a window's shards (distill.order blocks), whose sizes the caller already fitted into the cache.
PREFETCH_THREADS = 3
MAX_PENDING = 64


class ShardPrefetcher:
    """Downloads in flight, by cache file, in a small thread pool started on first use."""

    def __init__(self, threads: int = PREFETCH_THREADS, max_pending: int = MAX_PENDING) -> None:
        self.threads, self.max_pending = threads, max_pending
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[Path, Future] = {}
        self._lock = threading.Lock()

    def start(self, target: Path, fetch: Callable[[], Path]) -> bool:
        """Run `fetch` (which downloads `target`) in the background, unless it already runs or too many wait."""
        with self._lock:
            if target in self._inflight or len(self._inflight) >= self.max_pending:
                return False
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dsmd-prefetch")
            future = self._pool.submit(fetch)
            self._inflight[target] = future
        future.add_done_callback(lambda done: self._finished(target, done))
        return True

    def _finished(self, target: Path, future: Future) -> None:
        # A finished download is in the cache: forget it. A failed one stays for the read that needs the shard.
        if future.cancelled() or future.exception() is None:
            with self._lock:
                if self._inflight.get(target) is future:
                    del self._inflight[target]

    def claim(self, target: Path) -> Future | None:
        """The background download of `target` (running, failed or just finished), taken over by its reader."""
        with self._lock:
            return self._inflight.pop(target, None)

    def pending(self) -> int:
        with self._lock:
            return len(self._inflight)

    def close(self) -> None:
        """Drop what has not started and wait for the running downloads (each leaves a whole file or none)."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._inflight.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
