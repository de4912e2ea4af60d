"""Samples gathered during one collect, and their Prometheus text rendering.

Rendering happens once per collect, in the collector thread; a scrape then serves the bytes
as they are. That keeps scrape latency independent of GPU count and of NVML's health.
"""

from __future__ import annotations

import functools
import gzip
import math
from collections.abc import Iterator, Mapping

from .metrics import ORDER, SPECS, Spec

Labels = tuple[tuple[str, str], ...]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SampleSet:
    """Samples keyed by metric name; rejects undeclared names so typos cannot ship.

    The declared names are the native ones (metrics.py) unless another registry is given,
    as the dcgm-compatible rendering does."""

    def __init__(self, specs: Mapping[str, Spec] = SPECS, order: Mapping[str, int] = ORDER) -> None:
        self._specs = specs
        self._order = order
        self._samples: dict[str, dict[Labels, float]] = {}

    def add(self, name: str, labels: Mapping[str, str], value: float) -> None:
        if name not in self._specs:
            raise KeyError(f"metric {name!r} is not declared in metrics.py")
        key = tuple(labels.items())
        # Last write wins: a duplicate label set would make Prometheus reject the scrape.
        self._samples.setdefault(name, {})[key] = value

    def names(self) -> set[str]:
        return set(self._samples)

    def get(self, name: str) -> dict[Labels, float]:
        """The samples of one family (empty when none), for renderings derived from this one."""
        return self._samples.get(name, {})

    def items(self) -> Iterator[tuple[str, Labels, float]]:
        for name, samples in self._samples.items():
            for labels, value in samples.items():
                yield name, labels, value

    def render(self) -> bytes:
        out: list[str] = []
        for name in sorted(self._samples, key=self._order.__getitem__):
            spec = self._specs[name]
            out.append(f"# HELP {name} {spec.help}\n# TYPE {name} {spec.kind}\n")
            for labels, value in self._samples[name].items():
                out.append(f"{name}{_labels(labels)} {_value(value)}\n")
        return "".join(out).encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@functools.lru_cache(maxsize=16384)
def _labels(labels: Labels) -> str:
    """Cached: a GPU's label sets are the same collect after collect, and escaping them was
    most of the rendering time."""
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def gzip_bytes(body: bytes) -> bytes:
    """Compress once per collect; level 5 is most of level 9's ratio at a third of the CPU."""
    return gzip.compress(body, compresslevel=5, mtime=0)
