"""Timing of the engine's own work (the "sparse overhead" of the paper's Table 3), and of whole time steps
for the end-to-end benchmarks in ``tools/``."""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
import time
from typing import Callable

import torch


def median_step_ms(step: Callable[[int], object], count: int, warmup: int, events: bool = False) -> float:
    """Median time in ms of ``step(i)`` for i = warmup .. warmup + count - 1, after ``step(0 .. warmup - 1)``
    untimed: wall time with CUDA synchronised before and after each timed call, so a step's asynchronous
    work counts in full, or CUDA events with ``events`` (see :func:`interleaved_step_ms`)."""
    for i in range(warmup):
        step(i)
    return interleaved_step_ms({"step": step}, count, warmup, events)["step"]


def interleaved_step_ms(steps: dict[str, Callable[[int], object]], count: int, start: int,
                        events: bool = False) -> dict[str, float]:
    """Median time in ms of each of ``steps`` (name: ``step(i)``), for i = start .. start + count - 1,
    the steps taking turns within each i. Taking turns cancels slow drifts of the machine (host clock,
    other work on it) that would otherwise fall on one side of a comparison; nothing is run untimed.

    Each call is timed by wall clock with CUDA synchronised before and after it, or, with ``events``,
    between CUDA events recorded before and after it on the current stream (the span from the first work
    the call queues to the last, waiting for the end event only)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(start, start + count):
        for name, step in steps.items():
            times[name].append(_event_ms(step, i) if events else _wall_ms(step, i))
    return {name: statistics.median(values) for name, values in times.items()}


def _wall_ms(step: Callable[[int], object], i: int) -> float:
    synchronize()
    began = time.perf_counter()
    step(i)
    synchronize()
    return 1e3 * (time.perf_counter() - began)


def _event_ms(step: Callable[[int], object], i: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def benchmark_environment(cuda: bool) -> dict[str, str]:
    """Device, library versions and date, as a benchmark's JSON records them."""
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}


class PhaseLog:
    """Progress of a long benchmark on stderr: one line per phase, with the seconds since the start, so that
    a run stopped by a time limit shows where its time went (compilations, warm-ups, timed steps)."""

    def __init__(self) -> None:
        self._started = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self._started:7.1f} s] {message}", file=sys.stderr, flush=True)


class MeasuredRows:
    """The rows of a benchmark, written out as they are measured: ``path`` is rewritten as
    ``{"environment": ..., "results": rows}`` after every finished row (:meth:`append`) and, in the
    end-to-end benchmarks, after every tau of the row being measured (:meth:`measured`, which also prints
    that tau's line), so that a run stopped by a time limit keeps what it measured. ``table(rows)`` makes
    markdown of rows (for :meth:`measured`: row dicts with a ``"blockcopy"`` dict keyed by tau)."""

    def __init__(self, path: str, environment: dict, table: Callable[[list[dict]], str]) -> None:
        self.path, self.environment, self.table, self.rows = path, environment, table, []

    def measured(self, row: dict) -> None:
        """``row`` is the configuration being measured (not yet in ``rows``), its last tau just timed (called
        again for that tau when more of its figures, such as a ceiling, are added)."""
        print(self.table([{**row, "blockcopy": dict(list(row["blockcopy"].items())[-1:])}]), flush=True)
        self._write(self.rows + [row])

    def append(self, row: dict) -> None:
        """``row``'s configuration is finished."""
        self.rows.append(row)
        self._write(self.rows)

    def summary(self) -> str:
        return f"\n{self.environment}\n\n{self.table(self.rows)}"

    def _write(self, rows: list[dict]) -> None:
        with open(self.path, "w") as f:
            json.dump({"environment": self.environment, "results": rows}, f, indent=1)


def print_top_operators(title: str, step: Callable[[], object]) -> None:
    """The operators of one ``step()`` that took the most device time (CPU time without CUDA)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"\n{title}: top operators\n{profiler.key_averages().table(sort_by=sort, row_limit=15)}", flush=True)


def synchronize() -> None:
    """Wait for the current CUDA device's work, if there is a CUDA device."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class OverheadTimer:
    """Accumulates the wall time of the engine's tile moves and state writes during one frame.

    Used as ``with timer:`` around each piece of engine work. Only eager frames can be split this way
    (a replayed CUDA graph is one opaque launch); on CUDA each timed piece is bracketed by a device
    synchronisation, so the measured frame runs somewhat slower than an untimed one.
    """

    def __init__(self) -> None:
        self.active = False
        self.seconds = 0.0
        self._device: torch.device | None = None
        self._start = 0.0

    def start_frame(self, active: bool, device: torch.device) -> None:
        """Begin a frame: reset the total; time the following pieces only if ``active``."""
        self.active = active
        self.seconds = 0.0
        self._device = device if device.type == "cuda" else None

    def __enter__(self) -> "OverheadTimer":
        if self.active:
            if self._device is not None:
                torch.cuda.synchronize(self._device)
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            if self._device is not None:
                torch.cuda.synchronize(self._device)
            self.seconds += time.perf_counter() - self._start
