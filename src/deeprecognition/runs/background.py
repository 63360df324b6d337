"""Rank 0's storage writes (metrics log, TensorBoard events, mosaics) off the training loop: every
other rank waits for rank 0 at the next collective, so a write inline stalls them all.

One thread runs the jobs in order, from a queue of `capacity`: a store slower than the loop makes
`submit` wait (back-pressure) instead of holding more and more bytes in memory. A job that fails is
raised in the training loop at its next `submit` or `drain`, never swallowed; the jobs after it
are skipped (the run is about to stop with that error)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any


class BackgroundWriteError(RuntimeError):
    """A background write failed; its cause is the original error."""


class BackgroundWriter:
    def __init__(self, capacity: int = 4) -> None:
        self._jobs: queue.Queue[tuple[str, Callable[..., None], tuple[Any, ...]] | None] = queue.Queue(maxsize=capacity)
        self._failed: tuple[str, BaseException] | None = None
        self._thread: threading.Thread | None = None  # started on the first job: ranks without writes start none

    def submit(self, what: str, job: Callable[..., None], *args: Any) -> None:
        """Run `job(*args)` in the background after the jobs before it; `what` names it in errors.
        The arguments must not change afterwards (pass bytes or CPU copies, not live tensors)."""
        self._raise_failure()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="deeprec-background-writer", daemon=True)
            self._thread.start()
        self._jobs.put((what, job, args))

    def drain(self) -> None:
        """Wait until every job submitted so far is done; raise the first failure."""
        if self._thread is not None:
            self._jobs.join()
        self._raise_failure()

    def close(self) -> None:
        """Drain, then stop the thread."""
        try:
            self.drain()
        finally:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        # On the way out of a failed loop too: what it wrote before failing (the log up to its last
        # checkpoint) must be in storage for the resumed run. Its own error stays the one raised.
        try:
            self.close()
        except BackgroundWriteError as failure:
            if error is None:
                raise
            if not isinstance(error, BackgroundWriteError):  # else it is that same failure, raised already
                print(f"also: {failure}", flush=True)

    def _raise_failure(self) -> None:
        if self._failed is not None:
            what, error = self._failed
            raise BackgroundWriteError(
                f"rank 0's background write of {what} failed: {type(error).__name__}: {error}"
            ) from error

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            what, job, args = item
            try:
                if self._failed is None:
                    job(*args)
            except BaseException as error:  # noqa: BLE001 - handed to the training loop, which raises it
                self._failed = (what, error)
            finally:
                self._jobs.task_done()
