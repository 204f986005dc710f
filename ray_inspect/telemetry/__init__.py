"""Observability of scan and training runs: Prometheus metrics, a Pushgateway outcome, JSON logs.

The driver process is the single exposer of ``ray_inspect_*`` metrics (docs/monitoring.md says why):
actors hand per-image records back to the driver, which counts each image once. Without a metrics
port or a Pushgateway the recorders are no-ops, so library calls cost nothing.

Modules, one job each:
  process    ``Telemetry``: the process's metrics server and settings (``configure``/``current``)
  recorders  ``ScanRecorder``/``TrainRecorder``: what a run reports; ``ScanTelemetry``/``TrainTelemetry``
             record it, ``NULL_SCAN``/``NULL_TRAIN`` do not
  families   ``ScanMetrics``/``TrainMetrics``: the metric families, registered once per registry
  gauges     ``LazyGauges``: gauges that exist only once set
  push       ``Pusher``: a finished run's outcome to a Pushgateway
  logs       JSON/text logging, run id and image key on every record, credential redaction

Imports neither Ray nor click (the method core and the actors may import it).
"""

from ray_inspect.config import TelemetryConfig
from ray_inspect.telemetry.families import STAGES, ScanMetrics, TrainMetrics
from ray_inspect.telemetry.gauges import LazyGauges
from ray_inspect.telemetry.logs import (
    MASK,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    image_key,
    log,
    new_run_id,
    redact,
    set_run_id,
)
from ray_inspect.telemetry.process import PROCESS_REGISTRY, Telemetry, configure, current
from ray_inspect.telemetry.push import Pusher
from ray_inspect.telemetry.recorders import (
    NULL_SCAN,
    NULL_TRAIN,
    ScanRecorder,
    ScanTelemetry,
    TrainRecorder,
    TrainTelemetry,
    version,
)

__all__ = [
    "Telemetry", "TelemetryConfig", "configure", "current", "PROCESS_REGISTRY",
    "ScanRecorder", "TrainRecorder", "ScanTelemetry", "TrainTelemetry", "NULL_SCAN", "NULL_TRAIN", "version",
    "ScanMetrics", "TrainMetrics", "STAGES", "LazyGauges", "Pusher",
    "log", "configure_logging", "image_key", "set_run_id", "new_run_id", "redact", "MASK",
    "JsonFormatter", "TextFormatter",
]
