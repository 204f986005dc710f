"""Joining or starting Ray: ``--address``/``RAY_ADDRESS`` joins a cluster, otherwise a local Ray
sized to this machine starts (token authentication stays on, as Ray 2.60 sets it)."""

from __future__ import annotations

import os

from ray_inspect.io.storage import ENDPOINT_ENV

# Environment that workers on this machine must see (never credentials in configs or logs: the
# AWS_* variables reach workers through the environment the local Ray inherits at start-up).
FORWARDED_ENV = (ENDPOINT_ENV,)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> dict:
    """Connect to (or start) Ray once per process; returns the cluster's resources."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        kwargs = {"runtime_env": {"env_vars": env}} if env else {}
        if address:
            ray.init(address=address, log_to_driver=True, **kwargs)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True,
                     **kwargs)
    return ray.cluster_resources()
