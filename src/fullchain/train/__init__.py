"""Training: the Trainer, precision objects, schedules, callbacks, logging and evaluation."""

from fullchain.train.callbacks import Callback
from fullchain.train.trainer import Trainer, TrainResult

__all__ = ["Callback", "TrainResult", "Trainer"]
