"""Live A/B: each model of a `ds serve --ab-model` server, side by side, from its `variant`-labelled series.

The server labels every per-request series with ``variant`` ("a", "b"); keeping only one variant's samples
gives a snapshot the ordinary figures (quantiles, rates, error share) read as if that model served alone.
"""

from __future__ import annotations

import re

from fullchain import metric_names as M
from fullchain.monitor.report import Table
from fullchain.monitor.scrape import Snapshot
from fullchain.monitor.series import counted, error_share, histogram_delta

_VARIANT = re.compile(r'variant="([^"]*)"')


def variants_in(snap: Snapshot) -> list[str]:
    """The variant labels the server exposes, sorted; [] for a server with one model."""
    return sorted({m.group(1) for key in snap.with_prefix(M.SERVE_REQUESTS_TOTAL) if (m := _VARIANT.search(key))})


def of_variant(snap: Snapshot, variant: str) -> Snapshot:
    """Only the samples of `variant` (series without the label, such as in-flight requests, are dropped)."""
    label = f'variant="{variant}"'
    return Snapshot(snap.t, {key: value for key, value in snap.values.items() if label in key})


def variant_table(first: Snapshot, last: Snapshot) -> Table | None:
    """Requests, throughput, latency quantiles, errors and mean batch of each variant over the observation."""
    variants = variants_in(last)
    if not variants:
        return None
    seconds = last.t - first.t
    rows = []
    for variant in variants:
        before, after = of_variant(first, variant), of_variant(last, variant)
        requests = counted(after, M.SERVE_REQUESTS_TOTAL) - counted(before, M.SERVE_REQUESTS_TOTAL)
        latency = histogram_delta(before, after, M.SERVE_REQUEST_SECONDS)
        batch = histogram_delta(before, after, M.SERVE_BATCH_SIZE)
        rows.append([variant, int(requests), requests / seconds if seconds > 0 else float("nan"),
                     *(1000 * latency.quantile(q) for q in (0.5, 0.95, 0.99)), error_share(before, after),
                     batch.mean])
    return Table("Live A/B: each variant over the observation",
                 ["variant", "requests", "requests/s", "p50 ms", "p95 ms", "p99 ms", "error share", "mean batch"],
                 rows)
