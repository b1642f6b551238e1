"""Stopping a training run early, on every rank at the same iteration, as Megatron-LM does: SIGTERM or SIGINT (a
scheduler's notice before preemption, Ctrl-C; Megatron's ``--exit-signal-handler``, always on here) and
``--exit-duration-in-mins``. The caller saves a checkpoint at the end of that iteration and exits 0.

A signal only sets a flag; at the end of every iteration the ranks agree with one all-reduce (MAX) of two small
integers, so all of them stop after the same iteration even when only some got the signal. A second SIGINT stops at
once (the default action).
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopConditions:
    def __init__(self, device: torch.device, exit_duration_in_mins: Optional[float] = None):
        self.device = device
        self.deadline = time.monotonic() + 60 * exit_duration_in_mins if exit_duration_in_mins else None
        self.received: Optional[int] = None
        self._previous = {}

    def install(self) -> None:
        """Catch SIGTERM / SIGINT from now on (main thread only)."""
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """The handlers from before ``install``."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:  # asked twice: stop now
            signal.signal(signum, signal.default_int_handler)
            signal.raise_signal(signum)
            return
        self.received = signum

    def check(self) -> Optional[str]:
        """Collective (every rank, once per iteration): why the run stops now, or None."""
        timed_out = self.deadline is not None and time.monotonic() >= self.deadline
        flags = torch.tensor([self.received or 0, int(timed_out)], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        sig, timed_out = (int(v) for v in flags.tolist())
        if sig:
            return f"received {signal.Signals(sig).name}"
        if timed_out:
            return "--exit-duration-in-mins reached"
        return None
