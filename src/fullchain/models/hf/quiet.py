"""Silence transformers while it loads: its progress bars and its multi-line load report.

`from_pretrained` draws a "Loading weights" bar and logs a table of newly initialised tensors as a warning;
fullchain says the same in one line of its own (see `fullchain.models.hf.classifier`). transformers offers
the switches (verbosity, progress bars) but no scope for them, hence this small context manager.
"""

from __future__ import annotations

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
