"""Scraping a Prometheus ``/metrics`` endpoint into flat snapshots.

A `Snapshot` maps a sample key (``name`` or ``name{label="v",...}`` with labels sorted) to its value at
one moment, so two snapshots subtract directly into rates and histogram deltas. Parsing is
prometheus_client's own text parser; the HTTP client is httpx.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Snapshot:
    t: float  # seconds since the monitor started
    values: dict[str, float] = field(default_factory=dict)

    def get(self, key: str, default: float = math.nan) -> float:
        return self.values.get(key, default)

    def with_prefix(self, name: str) -> dict[str, float]:
        """Every sample of one series name (all label sets), e.g. the buckets of a histogram."""
        return {k: v for k, v in self.values.items() if k == name or k.startswith(name + "{")}


def sample_key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{labels[k]}"' for k in sorted(labels)) + "}"


def parse_metrics(text: str, t: float) -> Snapshot:
    """Prometheus text exposition -> Snapshot (``_created`` timestamps dropped: they are not measurements)."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            values[sample_key(sample.name, sample.labels)] = float(sample.value)
    return Snapshot(t=t, values=values)


def metrics_url(endpoint: str) -> str:
    """``localhost:8080`` / ``http://host:port`` / a full ``.../metrics`` URL -> the URL to scrape."""
    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    return url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"


class Scraper:
    """Fetches one endpoint; `scrape()` returns a Snapshot or raises `httpx.HTTPError` / `ValueError`."""

    def __init__(self, endpoint: str, timeout_s: float = 2.0, token: str | None = None):
        self.url = metrics_url(endpoint)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._client = httpx.Client(timeout=timeout_s, headers=headers)
        self._t0 = time.monotonic()

    def scrape(self) -> Snapshot:
        response = self._client.get(self.url)
        response.raise_for_status()
        return parse_metrics(response.text, time.monotonic() - self._t0)

    def close(self) -> None:
        self._client.close()
