"""Timing of the engine's own work (the "sparse overhead" of the paper's Table 3)."""
from __future__ import annotations

import time

import torch


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
