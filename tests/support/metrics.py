"""What a proxy's /metrics says: every sample, one sample, or a metric's sum."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.support.client import call
from tests.support.proxy import Proxy

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(proxy: Proxy) -> Samples:
    """Every sample of /metrics as (name, sorted labels) -> value."""
    status, _, body = call(proxy.admin_url + "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` with exactly these labels (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def gauge(proxy: Proxy, name: str) -> float:
    """The sum of a metric's samples on /metrics."""
    status, _, body = call(proxy.admin_url + "/metrics")
    assert status == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith((name + " ", name + "{")))  # fmt: skip
