"""The process budget, watched with psutil while a client trains.

A client's memory is its own increase over the process's resident size when training starts
(in simulation several clients share one Ray actor process, whose baseline is not theirs). A
thread samples it every few milliseconds; the trainer calls :meth:`MemoryGuard.check` after each
step, which also samples, and raises :class:`MemoryBudgetExceeded` once the budget was crossed.

Before the baseline is read, the C allocator is asked to hand its free pages back to the system
(glibc's ``malloc_trim``): otherwise a client that runs after another in the same process reuses
pages that are already resident, and its increase would read near zero however much it allocates.

What the guard counts is what the process holds after the allocator has returned what it does not
use. glibc keeps freed heap pages resident and its heap fragments, so with a steady training loop
the resident size still wanders by tens of MB from step to step (for ResNet-18 at 32 px: 90-136
MiB over 60 identical steps). So a reading above ``reclaim_at`` of the budget first hands the free
pages back and reads again: the process stays within its budget as long as what it really uses
fits, and a roomy client (never near its budget) pays nothing. ``reclaim_at=0`` reclaims at every
reading: the client planner measures a setting's need that way (:mod:`odl_fed.planning.device_plan`).
"""

from __future__ import annotations

import threading

import psutil

from odl_fed.training.allocator import release_free_memory

__all__ = ["MemoryGuard", "MemoryBudgetExceeded", "release_free_memory"]


class MemoryBudgetExceeded(RuntimeError):
    """Training used more memory than its budget; the message names the client, the budget, the peak."""

    def __init__(self, client: str, budget: int, peak: int):
        self.client, self.budget, self.peak = client, budget, peak
        super().__init__(f"client {client or '?'}: training memory {peak / 2**20:.1f} MiB exceeded its budget of "
                         f"{budget / 2**20:.1f} MiB (psutil RSS increase over the process's baseline)")


class MemoryGuard:
    """Context manager: peak RSS increase of this process while active, checked against ``budget``.

    Parameters
    ----------
    budget : int
        Bytes training may add to the process.
    client : str (default: "")
        Named in the error.
    interval : float (default: 0.005)
        Seconds between the sampling thread's readings.
    reclaim_at : float or None (default: 0.9)
        Above this fraction of the budget, a reading first returns the allocator's free pages to
        the system and reads again (None: never; 0: at every reading).
    """

    def __init__(self, budget: int, *, client: str = "", interval: float = 0.005, reclaim_at: float | None = 0.9):
        if budget <= 0:
            raise ValueError(f"budget must be positive, but got {budget!r}")
        if reclaim_at is not None and not 0 <= reclaim_at <= 1:
            raise ValueError(f"reclaim_at must be a fraction of the budget in [0, 1] or None, but got {reclaim_at!r}")
        self.budget = budget
        self.client = client
        self.interval = interval
        self._reclaim_above = None if reclaim_at is None else reclaim_at * budget
        self._process = psutil.Process()
        self.baseline = 0
        self.peak = 0
        self.samples = 0
        self.reclaims = 0
        self.step_peaks: list[int] = []  # the peak of each training step (see :meth:`end_step`)
        self._step_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        """Read the increase now (after reclaiming free pages, above ``reclaim_at``); keep the peak."""
        increase = self._process.memory_info().rss - self.baseline
        if self._reclaim_above is not None and increase > self._reclaim_above and release_free_memory():
            self.reclaims += 1
            increase = self._process.memory_info().rss - self.baseline
        self.samples += 1
        if increase > self.peak:
            self.peak = increase
        if increase > self._step_peak:
            self._step_peak = increase
        return increase

    def end_step(self) -> None:
        """Close a training step: keep its peak in :attr:`step_peaks`, then :meth:`check`."""
        self.sample()
        self.step_peaks.append(self._step_peak)
        self._step_peak = 0
        self.check()

    @property
    def breached(self) -> bool:
        return self.peak > self.budget

    def check(self) -> None:
        """Sample, and raise if the budget was ever crossed while the guard was active."""
        self.sample()
        if self.breached:
            raise MemoryBudgetExceeded(self.client, self.budget, self.peak)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemoryGuard:
        release_free_memory()
        self.baseline = self._process.memory_info().rss
        self.peak = self._step_peak = 0
        self.step_peaks = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name=f"memory-guard-{self.client}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
