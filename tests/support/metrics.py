"""A plugin's Prometheus metrics, as a scraper reads them from its `--metrics-port`."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text -> ``name{label="v",...}`` -> value."""
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


def scrape(port: int) -> dict[str, float]:
    """The metrics served on 127.0.0.1:``port`` now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return metric_values(response.read().decode())
