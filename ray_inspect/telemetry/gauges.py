"""Gauges that exist only once set: a collector whose series appear with their first value."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

Value = float | Callable[[], float]     # a number, or a function read at scrape time


def _read(value: Value) -> float:
    return value() if callable(value) else value


class LazyGauges(Collector):
    """Gauges that appear only once known: a last-success time of 0 would read as "failed since 1970",
    and a loss of 0 before the first epoch as a perfect model. Values may be callables (read at scrape)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._docs: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._values: dict[str, dict[tuple[str, ...], Value]] = {}

    def set(self, name: str, doc: str, value: Value, **labels: Any) -> None:
        names = tuple(sorted(labels))
        with self._lock:
            self._docs[name] = (doc, names)
            self._values.setdefault(name, {})[tuple(str(labels[n]) for n in names)] = value

    def replace(self, name: str, doc: str, value: float, **labels: Any) -> None:
        """Set the only series of ``name`` (an _info metric whose labels changed)."""
        with self._lock:
            self._values.pop(name, None)
        self.set(name, doc, value, **labels)

    def get(self, name: str, **labels: Any) -> float | None:
        with self._lock:
            v = self._values.get(name, {}).get(tuple(str(labels[n]) for n in sorted(labels)))
        return None if v is None else _read(v)

    def frozen(self, names: Iterable[str]) -> LazyGauges:
        """A copy of the named gauges with their current values (the outcome pushed at the end)."""
        out = LazyGauges()
        with self._lock:
            items = [(n, self._docs[n], dict(self._values[n])) for n in names if n in self._values]
        for name, (doc, labelnames), values in items:
            for lv, v in values.items():
                out.set(name, doc, _read(v), **dict(zip(labelnames, lv, strict=True)))
        return out

    def describe(self) -> list:
        return []   # names vary with the run; no collision check needed

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            items = [(n, self._docs[n], dict(v)) for n, v in self._values.items()]
        for name, (doc, labelnames), values in items:
            g = GaugeMetricFamily(name, doc, labels=labelnames)
            for lv, v in values.items():
                g.add_metric(list(lv), float(_read(v)))
            yield g
