"""Ray wiring: joining a cluster, data-parallel training, the scan's actor pool."""
