"""Training: the Trainer, precision objects, schedules, callbacks, logging and evaluation."""

from fullchain.train.callbacks import Callback
from fullchain.train.trainer import Trainer, TrainResult, cross_entropy_loss

__all__ = ["Callback", "TrainResult", "Trainer", "cross_entropy_loss"]
