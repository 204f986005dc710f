"""The method composed with storage: the per-image step, the epoch loop, calibration (no Ray)."""
