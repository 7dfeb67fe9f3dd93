"""Stopping a run early: SIGINT / SIGTERM honoured at the next step boundary, and the hard-kill test hook.

The first Ctrl-C (or SIGTERM) only sets a flag; the trainer checks it after each optimizer step, saves
a checkpoint there and exits with 128 + the signal number (130 for SIGINT). The same signal again
aborts at once, without saving (the checkpoint files are atomic, so that never tears one). Under
torchrun every rank gets the signal, maybe at different steps, so the ranks agree through one tiny
all-reduce on logged steps (``--log-every``) and save together there; torchrun itself then reports
the stop with its own traceback and exit status.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from types import FrameType
from typing import Any

import torch

from . import distributed as dist_

# Test hook: simulate a hard kill (SIGKILL-like, no clean-up) right after this optimizer step.
KILL_ENV = "MITA_TRAIN_KILL_AT_STEP"

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """A context manager turning SIGINT / SIGTERM into a stop request polled by :meth:`requested`."""

    def __init__(self, dist: dist_.DistInfo, device: torch.device, check_every: int) -> None:
        self.dist, self.device, self.check_every = dist, device, check_every
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._kill_at = int(os.environ.get(KILL_ENV, "-1"))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a data-loader worker forked with this handler: its parent stops it
            return
        self.signum = signum
        signal.signal(signum, self._previous[signum])  # the same signal again acts at once
        if self.dist.is_main:
            name = signal.Signals(signum).name
            print(
                f"\n{name}: stopping after this step to save a checkpoint (again to abort)", file=sys.stderr
            )

    def __enter__(self) -> StopSignals:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, step: int) -> bool:
        """Whether to stop after ``step`` (the same answer on every rank)."""
        if step == self._kill_at:
            sys.stderr.flush()
            os._exit(137)
        if not self.dist.enabled:
            return self.signum is not None
        if step % self.check_every:
            return False
        flag = torch.tensor([float(self.signum or 0)], device=self.device)
        signum = int(dist_.all_reduce_max(flag, self.dist).item())
        self.signum = signum or None
        return signum != 0


def resume_command(cfg: Any, dist: dist_.DistInfo) -> str:
    """The command that continues this run: this process's own ``mita train`` command with ``--resume``."""
    argv = sys.argv[1:]
    if argv[:1] != ["train"]:  # called from Python, not the command line
        return f"mita train with this run's settings, --out {shlex.quote(str(cfg.out))} and --resume"
    args = argv[1:] + ([] if "--resume" in argv else ["--resume"])
    launcher = f"torchrun --nproc_per_node={dist.world_size} -m mita" if dist.enabled else "mita"
    return f"{launcher} train {shlex.join(args)}"
