"""Live A/B in `ds serve`: which of two served models answers each request.

Each request draws its variant independently at random by weight, so no pattern of clients, request order or
timing can line up with the split (a round-robin would hand every second request of a client that alternates
two kinds of input to the same model). The draw happens when the request arrives, before anything else, so
every outcome (including 4xx answers to bad input) is counted for the model that would have answered it.
"""

from __future__ import annotations

import random

from fullchain.errors import UserError

PRIMARY, CANDIDATE = "a", "b"


def check_weight(weight_b: float) -> float:
    if not 0 < weight_b < 1:
        raise UserError(f"--ab-weight {weight_b}: the share of requests for the second model must lie strictly "
                        "between 0 and 1")
    return weight_b


class TrafficSplit:
    """`pick()` -> a variant name, "a" with probability 1 - weight_b, "b" with weight_b (always "a" alone)."""

    def __init__(self, weight_b: float | None = None, rng: random.Random | None = None):
        self.weight_b = weight_b if weight_b is None else check_weight(weight_b)
        self.rng = rng or random.Random()
        self.variants = (PRIMARY,) if weight_b is None else (PRIMARY, CANDIDATE)

    @property
    def active(self) -> bool:
        return self.weight_b is not None

    def pick(self) -> str:
        if self.weight_b is None:
            return PRIMARY
        return CANDIDATE if self.rng.random() < self.weight_b else PRIMARY
