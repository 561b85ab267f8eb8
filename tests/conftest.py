"""Small trained artifacts that several test modules read, trained once per session; the suite's time budget.

A test that writes into an artifact's directory works on a copy (`shutil.copytree` into its tmp_path).
"""

import os
import time
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two xdist workers on the two cores: one thread each (and in the processes they start), or
    # four OpenMP teams spin against each other and a millisecond kernel waits out whole scheduler slices.
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

TINY_TRANSFORMER = {"name": "transformer", "args": {"d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64}}
BBC_SLICE = {"name": "bbc_news", "max_samples": 300, "tokenizer": {"vocab_size": 800, "max_length": 96}}
_STARTED = pytest.StashKey[float]()


@pytest.fixture(scope="session")
def digits_mlp(tmp_path_factory) -> Path:
    """A digits MLP (one hidden layer of 64), 80 steps: accurate enough to be judged."""
    from artifact_support import train  # here, so that collecting the light tests does not import torch

    return train(tmp_path_factory.mktemp("digits_mlp"), "digits", {"name": "mlp", "args": {"hidden": [64]}},
                 {"name": "digits"}, 80)


@pytest.fixture(scope="session")
def bbc_transformer(tmp_path_factory) -> Path:
    """A one-layer Transformer with its tokenizer, on 300 BBC News articles, 5 steps: served and exported, not
    judged."""
    from artifact_support import train

    return train(tmp_path_factory.mktemp("bbc_transformer"), "bbc", TINY_TRANSFORMER, BBC_SLICE, 5)


# ---- the time budget ------------------------------------------------------------------------------------------

SUITE_BUDGET_S = 600  # `make test` here (2 shared cores), set-up excluded: over it, shorten the slowest tests


# The files that take longest, longest first. xdist's loadfile hands out whole files in collection order, so a long
# file collected late (test_optimize after test_bench) kept one worker busy alone for the last minute or two.
LONGEST_FILES_FIRST = ("test_bench.py", "test_optimize.py", "test_hf_chain.py", "test_parallel.py", "test_resume.py",
                       "test_quantize.py", "test_compression.py", "test_parallel_fused_qkv.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


def pytest_sessionstart(session):
    session.config.stash[_STARTED] = time.monotonic()


def pytest_terminal_summary(terminalreporter, config):
    took = time.monotonic() - config.stash[_STARTED]
    over = " (over it: shorten the slowest tests listed above)" if took > SUITE_BUDGET_S else ""
    terminalreporter.write_line(f"tests took {took:.0f} s; the whole suite's budget is {SUITE_BUDGET_S} s{over}")
