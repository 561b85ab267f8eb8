"""Checkpoints: asynchronous, atomic, checksummed saves and resume from the newest one that verifies.

- `Checkpointer` (checkpointer.py): staging, the writer thread, commit, retention, `latest_valid`,
  `resume_point` (refuses to start over when checkpoints exist and none verifies), `load`;
- files.py: the directory layout, pickle-free structures (JSON + safetensors), durable writes, verification;
- sharded.py: world size > 1 through torch.distributed.checkpoint, with a metadata reader that does not
  run arbitrary pickles;
- rng.py: `capture_rng_state` / `restore_rng_state` (JSON-able, exact).
"""

from fullchain.train.checkpoint.checkpointer import Checkpointer
from fullchain.train.checkpoint.rng import capture_rng_state, restore_rng_state
from fullchain.train.checkpoint.state import CheckpointError, CheckpointWarning, NoValidCheckpoint, TrainingState

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "Checkpointer",
    "NoValidCheckpoint",
    "TrainingState",
    "capture_rng_state",
    "restore_rng_state",
]
