"""What a step does when its loss or gradients are NaN or infinite (fp32 and bf16).

fp16 has its own answer: the loss scaler skips a step whose gradients overflow and lowers the scale (counted
as ``amp_skipped_steps_total``), so this guard stands aside there. In fp32 and bf16 a non-finite value means
the run has diverged (a learning rate too high, a bad sample, a log of zero); applying the update would write
NaN into every weight and every later checkpoint. With ``train.on_nonfinite: stop`` (the default) the step is
not applied and training stops with a message naming the step, so the last good checkpoint stays the newest
and no artifact is written from broken weights; with ``skip`` the update is dropped, counted in
``nonfinite_skipped_steps_total``, and training goes on.

The check costs one reduction over the gradient norms and one host sync per step; with several ranks the
verdict is agreed on by all of them (one all-reduce of a flag), so no rank stops while another waits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fullchain.errors import UserError

POLICIES = ("stop", "skip")


class NonFiniteTraining(UserError):
    """Training stopped at a step whose loss or gradients were not finite; the CLI exits with 1."""

    exit_code = 1


class NonFiniteGuard:
    """Decides, once per step, whether the update may be applied (see the module docstring)."""

    def __init__(self, policy: str, precision: str, any_rank: Callable[[bool], bool] = lambda flag: flag):
        if policy not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.active = precision != "fp16"
        self.any_rank = any_rank
        self.skipped_steps = 0

    def admits(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """True when the update may be applied; False to skip it; raises `NonFiniteTraining` to stop."""
        if not self.active:
            return True
        bad = not bool(torch.isfinite(loss).all() & torch.isfinite(grad_norm).all())
        if not self.any_rank(bad):
            return True
        if self.policy == "skip":
            self.skipped_steps += 1
            return False
        what = (f"the loss is {float(loss)}" if not bool(torch.isfinite(loss).all())
                else f"the gradient norm is {float(grad_norm)} (loss {float(loss):.4g})")
        raise NonFiniteTraining(
            f"step {step}: {what}; "
            "training stopped before applying it, the newest checkpoint is the last good one and no model was "
            "written; lower train.optimizer.lr, set train.clip_norm, or set train.on_nonfinite: skip"
        )

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
