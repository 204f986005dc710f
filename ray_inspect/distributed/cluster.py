"""Joining or starting Ray: ``--address``/``RAY_ADDRESS`` joins a cluster, otherwise a local Ray
sized to this machine starts (token authentication stays on, as Ray 2.60 sets it).

Quiet by default: Ray's own log lines (worker output, controller and checkpoint messages, start-up
notices) stay in Ray's log files; the caller reports failures from the exceptions Ray raises.
``set_verbose(True)`` (the CLI's ``--verbose``) streams them to the terminal again.
"""

from __future__ import annotations

import logging
import os

from ray_inspect.config import DEVICE_ENV
from ray_inspect.io.storage import ENDPOINT_ENVS

# Environment that workers on this machine must see (never credentials in configs or logs: the
# AWS_* variables reach workers through the environment the local Ray inherits at start-up).
FORWARDED_ENV = (*ENDPOINT_ENVS, DEVICE_ENV)
_verbose = False
log = logging.getLogger(__name__)


class ResourcesUnavailable(TimeoutError):
    """Workers or actors could not start within --wait-for-resources; the message says what was
    asked and what the cluster offered."""


_INTERNAL_RESOURCES = ("node:", "memory", "object_store_memory", "accelerator_type:")


def offer(resources: dict) -> str:
    """Resources as a short text (CPU, GPU and custom ones, not Ray's bookkeeping), e.g. ``{CPU: 2}``."""
    shown = {k: v for k, v in sorted(resources.items()) if v and not k.startswith(_INTERNAL_RESOURCES)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in shown.items()) + "}" if shown else "nothing"


def set_verbose(verbose: bool) -> None:
    """Show Ray's own log lines (worker output included) on this process's terminal."""
    global _verbose
    _verbose = verbose
    _quiet_ray_loggers(not verbose)


def _quiet_ray_loggers(quiet: bool) -> None:
    for name in ("ray", "ray.train", "ray.tune", "ray.data", "ray.util"):
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.NOTSET)


def _route_ray_errors() -> None:
    """Ray's driver prints the errors its raylets publish ("A worker died or was killed ...") on
    stdout, where the JSON and tables go, whatever ``log_to_driver`` says. Unless verbose they go to
    this log at debug level: the scan and training report those failures in their own lines."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    original = ray_worker.print_to_stdstream
    if getattr(original, "routed_by_ray_inspect", False):
        return

    def routed(data, ignore_prefix):
        if _verbose:
            return original(data, ignore_prefix)
        for line in data.get("lines", []):
            log.debug("ray (%s): %s", data.get("pid"), line)
        return None

    routed.routed_by_ray_inspect = True
    ray_worker.print_to_stdstream = routed


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> dict:
    """Connect to (or start) Ray once per process; returns the cluster's resources."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        kwargs = {"runtime_env": {"env_vars": env}} if env else {}
        quiet = {"log_to_driver": _verbose, "logging_level": logging.INFO if _verbose else logging.ERROR}
        _quiet_ray_loggers(not _verbose)
        _route_ray_errors()
        if address:
            ray.init(address=address, **quiet, **kwargs)
        else:   # "local": never the machine's current Ray that someone else started
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     **quiet, **kwargs)
        _quiet_ray_loggers(not _verbose)   # ray.init configures its loggers anew
    return ray.cluster_resources()
