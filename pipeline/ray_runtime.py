"""Connecting to Ray: an in-process local cluster by default, an existing one with an address."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None) -> None:
    """Start or join Ray once per process; `address` (or $RAY_ADDRESS) joins an existing cluster."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("SEGMILL_PROGRESS", "0") == "1"
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    log.info("Ray resources: %s", ray.cluster_resources())
