"""The outcome of a finished run, pushed to a Prometheus Pushgateway."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from ray_inspect.telemetry.logs import log


@dataclass(frozen=True)
class Pusher:
    """Pushes a finished run's outcome to a Pushgateway group ``job=<job>, pipeline=<pipeline>``.

    POST (pushadd) replaces only the metric names it carries; a failed run's push leaves out the
    last-success gauge, so the previous success's timestamp stays in the group.
    """

    url: str
    job: str
    pipeline: str = "default"
    timeout: float = 10.0

    def push(self, registry: CollectorRegistry) -> bool:
        from prometheus_client import pushadd_to_gateway

        try:
            pushadd_to_gateway(self.url, job=self.job, registry=registry,
                               grouping_key={"pipeline": self.pipeline}, timeout=self.timeout)
            return True
        except Exception as exc:  # noqa: BLE001 - monitoring must not fail a finished run
            log.warning("push to the Pushgateway failed: %s", exc)
            return False
