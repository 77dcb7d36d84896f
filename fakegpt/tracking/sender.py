"""The metric sender of a long run: `MetricLogger` logs metrics from a background thread with retries and
back-off, so a tracking-server hiccup never stops training (every point also goes to a local JSONL file)."""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fakegpt.errors import one_line

log = logging.getLogger(__name__)


class MetricLogger:
    """Metrics of one long run, logged without ever blocking or stopping it on a tracking fault.

    `log` appends the point to `local_file` (JSONL: step, timestamp in ms, metrics; the complete local copy)
    and queues it; a background thread sends the queue in batches with `MlflowClient.log_batch`. When a send
    fails the points stay queued, one warning is logged, and the thread retries with exponential back-off
    (`backoff` s doubling up to `max_backoff` s); when the server answers again the backlog is sent in order
    and one line says so. `close` waits up to `close_timeout` s for the queue to drain and returns how many
    points could not be sent (they are in `local_file`). Start-up faults are not this class's business: the
    run's start (`run`) fails fast.
    """

    BATCH = 1000  # MLflow's limit of metrics per log_batch call
    # Seconds points gather before a send: a few writes a minute instead of one per iteration. Sent one by one,
    # --log-interval 1 cost a 2-layer CPU run +6.4% against SQLite; batched every 5 s, logging's own CPU time
    # (log() + this thread) is 0.23% of such a run. tools/bench_train.py --logging measures both.
    FLUSH_INTERVAL = 5.0

    def __init__(
        self,
        run_id: str | None,
        local_file: str | Path | None = None,
        *,
        backoff: float = 0.5,
        max_backoff: float = 60.0,
        flush_interval: float | None = None,
        close_timeout: float = 60.0,
        client: Any = None,
    ):
        self.run_id = run_id
        self.local_file = Path(local_file) if local_file is not None else None
        self.backoff, self.max_backoff, self.close_timeout = backoff, max_backoff, close_timeout
        self.flush_interval = self.FLUSH_INTERVAL if flush_interval is None else flush_interval
        self._client = client
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[Any] = []  # taken from the queue, not yet sent (kept across failures, in order)
        self._closing = threading.Event()
        self._wake = threading.Event()  # send now: set by flush() and close()
        self._deadline = math.inf
        self._sent = 0
        self.failures = 0
        # what logging itself costs, for tools/bench_train.py --logging: seconds inside log() on the training
        # thread, and the sender thread's CPU seconds (time.thread_time at its end)
        self.log_seconds = 0.0
        self.sender_cpu_seconds = 0.0
        self._down_since: float | None = None
        self._local = None
        if self.local_file is not None:
            self.local_file.parent.mkdir(parents=True, exist_ok=True)
            self._local = open(self.local_file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
        self._thread = threading.Thread(target=self._send_loop, name="fakegpt-metrics", daemon=True)
        if run_id is not None:
            self._thread.start()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def log(self, metrics: Mapping[str, float | None], step: int) -> None:
        """Queue one point of these metrics at `step` (and append it to the local copy); never blocks."""
        started = time.perf_counter()
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if not clean:
            return
        ts = int(time.time() * 1000)
        if self._local is not None:
            self._local.write(json.dumps({"step": step, "timestamp": ts, **clean}) + "\n")
        if self.run_id is not None:
            from mlflow.entities import Metric

            for key, value in clean.items():
                self._queue.put(Metric(key, value, ts, step))
        self.log_seconds += time.perf_counter() - started

    def _drain(self) -> None:
        while len(self._pending) < self.BATCH:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _send_loop(self) -> None:
        try:
            self._send_until_closed()
        finally:
            self.sender_cpu_seconds = time.thread_time()

    def _send_until_closed(self) -> None:
        delay = self.backoff
        while True:
            if not self._pending:
                try:
                    self._pending.append(self._queue.get(timeout=0.2))
                except queue.Empty:
                    if self._closing.is_set():
                        return
                    continue
                # Let points gather for a moment: one write per second instead of one per iteration keeps the
                # store's transactions (and a server's round trips) off the training loop's CPU time.
                self._wake.wait(self.flush_interval)
                if not self._closing.is_set():
                    self._wake.clear()
            self._drain()
            try:
                if self._client is None:
                    import mlflow

                    self._client = mlflow.MlflowClient()
                client = self._client
                client.log_batch(self.run_id, metrics=self._pending)
            except Exception as exc:  # any transport or server error: keep the points, back off, retry
                self.failures += 1
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    where = f"; every point is also in {self.local_file}" if self.local_file else ""
                    log.warning(
                        "MLflow tracking failed (%s); training goes on, metrics are buffered and retried%s",
                        one_line(exc, limit=200, with_type=True),
                        where,
                    )
                if self._closing.is_set():  # closing: keep trying until the deadline, then give up
                    remaining = self._deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    time.sleep(min(delay, remaining))
                else:
                    self._closing.wait(delay)
                delay = min(self.max_backoff, delay * 2)
                continue
            self._sent += len(self._pending)
            self._pending = []
            if self._down_since is not None:
                log.warning(
                    "MLflow tracking is back after %.0f s: buffered metrics sent", time.monotonic() - self._down_since
                )
                self._down_since = None
            delay = self.backoff

    def close(self) -> int:
        """Flush what can be flushed within `close_timeout` seconds; returns the number of unsent points."""
        self._deadline = time.monotonic() + self.close_timeout
        self._closing.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self.close_timeout + 1)
        unsent = len(self._pending) + self._queue.qsize() if self.run_id is not None else 0
        if self._local is not None:
            self._local.close()
            self._local = None
        if unsent:
            where = f"; they are in {self.local_file}" if self.local_file else ""
            log.warning("MLflow tracking: %d metric points could not be sent%s", unsent, where)
        return unsent

    def flush(self, timeout: float = 10.0) -> bool:
        """Send what is queued now and wait (at most `timeout` s) until it reached the store; False if it did not
        (the store is down: the points stay queued). Training calls it with each resume state, so that the
        store holds every point up to the state it could resume from."""
        if self.run_id is None or not self._thread.is_alive():
            return True
        deadline = time.monotonic() + timeout
        while (self._pending or self._queue.qsize()) and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.01)
        return not (self._pending or self._queue.qsize())

    @property
    def sent(self) -> int:
        """How many metric values reached the server so far."""
        return self._sent
