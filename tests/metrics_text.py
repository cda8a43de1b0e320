"""Reading `/metrics` in tests: the text format parsed into {(sample name, labels): value}."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(base: str, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"http://{base}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    return parse(response.text)


def value(samples: Samples, name: str, **labels: object) -> float:
    """One sample's value (0.0 when the series does not exist)."""
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def per_gpu(samples: Samples, name: str) -> dict[int, float]:
    """{gpu_id: value} for a metric labelled by gpu_id only."""
    out = {}
    for (sample, labels), v in samples.items():
        d = dict(labels)
        if sample == name and set(d) == {"gpu_id"}:
            out[int(d["gpu_id"])] = v
    return out
