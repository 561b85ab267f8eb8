"""Silence transformers while it loads: its progress bars and its multi-line load report, and the warnings its
import sets off.

`from_pretrained` draws a "Loading weights" bar and logs a table of newly initialised tensors as a warning;
fullchain says the same in one line of its own (see `fullchain.models.hf.classifier`). transformers offers
the switches (verbosity, progress bars) but no scope for them, hence these small context managers.

Importing transformers imports torchao when it is installed (its quantizers check for it), and torchao warns
about its CUDA-only extensions and sets off torch's pytree warnings about its enums: four lines of stderr on
every command that touches a Hugging Face model, none of which concerns it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from transformers.utils import logging as hf_logging


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Errors only and no progress bars inside the block; the previous settings afterwards."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


_IMPORT_CHATTER = ("torchao", "torch.utils._pytree")  # the loggers that speak while transformers is imported


@contextmanager
def quiet_imports() -> Iterator[None]:
    """Errors only from the loggers that warn while transformers (and the torchao it imports) are imported."""
    loggers = [logging.getLogger(name) for name in _IMPORT_CHATTER]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
