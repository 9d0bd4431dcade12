"""BentoML's own request-rate ceiling: a service whose APIs do nothing.

``bench.serving`` serves it beside genserve in the same run (BENCHMARKING.md: "measure the
framework's ceiling in the same run"). Configured as genserve configures BentoML (one worker,
BentoML's access log off, the API routes left out of tracing, the same timeout), with a
1-row body of the same size as genserve's. ``/noop`` is batchable with genserve's default
batching limits; ``/noop_plain`` is not. What they answer per second is what BentoML's HTTP
route costs per request here, before any model runs.
"""

from __future__ import annotations

import bentoml

ROUTES = ["/noop", "/noop_plain"]


@bentoml.service(name="noop", workers=1, traffic={"timeout": 60},
                  logging={"access": {"enabled": False}},
                  tracing={"excluded_urls": ROUTES})
class NoOp:
    @bentoml.api(route="/noop", batchable=True, max_batch_size=4096, max_latency_ms=30000)
    def noop(self, x: list[list[float]]) -> list[float]:
        """One 0.0 per row: nothing computed."""
        return [0.0] * len(x)

    @bentoml.api(route="/noop_plain")
    def noop_plain(self, x: list[list[float]]) -> list[float]:
        return [0.0] * len(x)
