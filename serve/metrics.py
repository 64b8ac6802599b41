"""Prometheus text-format metrics of the server: request counts, latency and batch-size histograms."""

from __future__ import annotations

import threading

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Histogram:
    def __init__(self, bounds):
        self.bounds, self.counts, self.sum, self.n = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1
        self.sum, self.n = self.sum + value, self.n + 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep, tail = ("," if labels else ""), (f"{{{labels}}}" if labels else "")
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        return out + [f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}', f"{name}_sum{tail} {self.sum:.6f}",
                      f"{name}_count{tail} {self.n}"]


class Metrics:
    """Request counts by route/method/status, latency and batch-size histograms, in Prometheus text format."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.batches = _Histogram(_BATCH_BUCKETS)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (route, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(route, _Histogram(_LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self.batches.observe(size)

    def render(self, index_size: int, index_version: str, model_version: str) -> str:
        with self._lock:
            lines = ["# HELP twotower_requests_total HTTP requests by route, method and status.",
                     "# TYPE twotower_requests_total counter"]
            lines += [f'twotower_requests_total{{route="{r}",method="{m}",status="{s}"}} {n}'
                      for (r, m, s), n in sorted(self.requests.items())]
            lines += ["# HELP twotower_request_seconds Request latency.", "# TYPE twotower_request_seconds histogram"]
            for route, hist in sorted(self.latency.items()):
                lines += hist.lines("twotower_request_seconds", f'route="{route}"')
            lines += ["# HELP twotower_batch_size Queries per user-tower call.", "# TYPE twotower_batch_size histogram"]
            lines += self.batches.lines("twotower_batch_size", "")
        lines += ["# HELP twotower_index_items Items in the live index.", "# TYPE twotower_index_items gauge",
                  f"twotower_index_items {index_size}",
                  "# HELP twotower_index_info The live index and model versions.", "# TYPE twotower_index_info gauge",
                  f'twotower_index_info{{index_version="{index_version}",model_version="{model_version}"}} 1']
        return "\n".join(lines) + "\n"
