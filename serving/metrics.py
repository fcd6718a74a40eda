"""Request counters and latency histograms, rendered in the Prometheus text exposition format.

Hand-written rather than ``prometheus_client``: a few counters and histograms behind one lock are
all the server needs, and the text format (``# HELP`` / ``# TYPE`` / samples) is stable.
"""

from __future__ import annotations

import copy
import gc
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

# seconds; dense where the funnel's latencies live (sub-millisecond stages to a 150 ms budget)
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: tuple[tuple[str, str], ...], extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        i = 0
        while i < len(self.buckets) and value > self.buckets[i]:
            i += 1
        self.counts[i] += 1
        self.total += value
        self.n += 1


# seconds; a young collection takes microseconds, a full one of an unfrozen server hundreds of ms
GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


class GcPauses:
    """Durations of the cyclic garbage collector's passes, by generation, from ``gc.callbacks``.

    Every pass holds the GIL, so it stalls every request in flight: the number that showed the
    64-client tail (see ``serving.compute.freeze_heap``). No lock: the callback runs inside a collection,
    possibly on a thread that holds another lock, and collections never overlap.
    """

    def __init__(self) -> None:
        self.pauses = {g: Histogram(GC_BUCKETS) for g in range(3)}
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif phase == "stop" and info.get("generation") in self.pauses:
            self.pauses[info["generation"]].observe(time.perf_counter() - self._started)


GC_PAUSES = GcPauses()
if GC_PAUSES not in gc.callbacks:
    gc.callbacks.append(GC_PAUSES)


@dataclass
class GcState:
    """One process's collector figures: pauses by generation and the frozen object count."""

    pauses: dict[int, Histogram]
    frozen: int


def gc_state() -> GcState:
    """This process's :class:`GcState` (a copy: the compute process sends it to the HTTP process)."""
    return GcState(pauses=copy.deepcopy(GC_PAUSES.pauses), frozen=gc.get_freeze_count())


class Metrics:
    """Thread-safe counters and histograms keyed by label tuples."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.request_latency: dict[tuple[tuple[str, str], ...], Histogram] = defaultdict(Histogram)
        self.stage_latency: dict[tuple[tuple[str, str], ...], Histogram] = defaultdict(Histogram)
        self.reloads: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.batch_size: dict[tuple[tuple[str, str], ...], Histogram] = defaultdict(
            lambda: Histogram(BATCH_BUCKETS)
        )
        self.bundle: dict[str, str] = {}

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(("endpoint", endpoint), ("method", method), ("status", str(status)))] += 1
            self.request_latency[(("endpoint", endpoint),)].observe(seconds)

    def stages(self, latency_ms: dict[str, float], stages: tuple[str, ...]) -> None:
        with self._lock:
            for stage in stages:
                if stage in latency_ms:
                    self.stage_latency[(("stage", stage),)].observe(latency_ms[stage] / 1000.0)

    def batch(self, size: int) -> None:
        """The size of the batch a /recommend request was computed in (one observation per request)."""
        with self._lock:
            self.batch_size[()].observe(size)

    def reload(self, result: str) -> None:
        with self._lock:
            self.reloads[(("result", result),)] += 1

    def set_bundle(self, version: str, path: str) -> None:
        with self._lock:
            self.bundle = {"version": version, "path": path}

    def render(self, processes: dict[str, GcState] | None = None) -> str:
        """The exposition text; the collector series per process (default: this one, as ``http``)."""
        processes = processes or {"http": gc_state()}
        lines: list[str] = []
        with self._lock:
            lines += [
                "# HELP funnel_requests_total HTTP requests by endpoint, method and status code.",
                "# TYPE funnel_requests_total counter",
            ]
            for labels, value in sorted(self.requests.items()):
                lines.append(f"funnel_requests_total{_labels(labels)} {value}")
            self._histogram(
                lines,
                "funnel_request_duration_seconds",
                "Server-side request latency by endpoint.",
                self.request_latency,
            )
            self._histogram(
                lines,
                "funnel_stage_duration_seconds",
                "Latency of the funnel stages of /recommend: queue (waiting for its batch), retrieval, "
                "ranking, rerank (of its batch), total (queue to answer).",
                self.stage_latency,
            )
            self._histogram(
                lines,
                "funnel_batch_size",
                "Requests in the batch each /recommend request was computed in (cross-request batching).",
                self.batch_size,
            )
            lines += [
                "# HELP funnel_reloads_total Bundle reloads by result (ok, refused).",
                "# TYPE funnel_reloads_total counter",
            ]
            for labels, value in sorted(self.reloads.items()):
                lines.append(f"funnel_reloads_total{_labels(labels)} {value}")
            self._histogram(
                lines,
                "funnel_gc_pause_seconds",
                "Passes of Python's cyclic garbage collector by generation and process (http; compute: the "
                "compute process, when the models run in one); each stalls every request of its process.",
                {
                    (("generation", str(g)), ("process", name)): h
                    for name, state in processes.items()
                    for g, h in state.pauses.items()
                },
            )
            lines += [
                "# HELP funnel_gc_frozen_objects Objects the garbage collector skips (frozen after loading).",
                "# TYPE funnel_gc_frozen_objects gauge",
                *(
                    f"funnel_gc_frozen_objects{_labels((('process', name),))} {state.frozen}"
                    for name, state in sorted(processes.items())
                ),
            ]
            if self.bundle:
                lines += [
                    "# HELP funnel_bundle_info The bundle being served.",
                    "# TYPE funnel_bundle_info gauge",
                    f"funnel_bundle_info{_labels(tuple(sorted(self.bundle.items())))} 1",
                ]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _histogram(
        lines: list[str], name: str, help_text: str, series: dict[tuple[tuple[str, str], ...], Histogram]
    ) -> None:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for labels, h in sorted(series.items()):
            cumulative = 0
            for bound, count in zip([*h.buckets, float("inf")], h.counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                bucket = _labels(labels, f'le="{le}"')
                lines.append(f"{name}_bucket{bucket} {cumulative}")
            lines.append(f"{name}_sum{_labels(labels)} {h.total}")
            lines.append(f"{name}_count{_labels(labels)} {h.n}")
