"""A digits MLP that sends its own process a real signal during the forward pass of a chosen training step.

`ds train` runs it as a user model (``model.target: resume_support:SignalledMLP``, with tests/ on PYTHONPATH),
so a fault lands at a known step, mid-step, instead of wherever a sleeping test happened to wake up. What to
send and when comes from the environment, so the interrupted run and its uninterrupted reference share one run
file (and one config hash):

    SIGNAL_AT_STEP=13 SIGNAL_NAME=SIGKILL SIGNAL_RANK=1

Under torchrun the signal is sent on the first attempt only (TORCHELASTIC_RESTART_COUNT 0), so a restarted
group runs to the end.
"""

from __future__ import annotations

import os
import signal

import torch

from fullchain.models.mlp import MLP


def signal_env(step: int, name: str = "SIGTERM", rank: int | None = None) -> dict[str, str]:
    """The environment that makes a `SignalledMLP` run send `name` during step `step` (on `rank` only)."""
    env = {"SIGNAL_AT_STEP": str(step), "SIGNAL_NAME": name}
    return env if rank is None else {**env, "SIGNAL_RANK": str(rank)}


class SignalledMLP(MLP):
    forward_calls = 0  # training forwards of this process: one per step with grad_accum 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.forward_calls += 1
            if self.forward_calls == int(os.environ.get("SIGNAL_AT_STEP", "0")) and self._signal_here():
                os.kill(os.getpid(), getattr(signal, os.environ.get("SIGNAL_NAME", "SIGTERM")))
        return super().forward(x)

    @staticmethod
    def _signal_here() -> bool:
        rank = os.environ.get("SIGNAL_RANK")
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        return first_attempt and (rank is None or os.environ.get("RANK", "0") == rank)
