"""Whether this host's runs directory can hold a request's run, asked before the worker claims it.

Procrastinate hands a job to whichever worker asks first; it knows nothing of disks. So the
worker asks here at the start of the job, before it claims the request: a run needs about twice
the source's data (the instance's copy, then the bootable disk: the same figure 00-acquire
checks, :func:`imaging.clouds.acquire.acquire`). When this host's runs directory has less free,
the request is not claimed: it goes back to the queue for ``worker.space_wait_seconds``
(:meth:`imaging.service.store.Store.leave_for_space`), for a host with room or for this one once
retention has removed old runs, and the worker says why in its log and in the request's history
(``/metrics`` counts those: ``imaging_space_refusals``).

What cannot be told before the copy is not refused here: a cloud's instance (its data is known
only once it has arrived; 00-acquire checks then, and its run fails with the figures), and a
run that exists on this host already (its disks are here; resuming needs less).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from imaging import config
from imaging.clouds import acquire
from imaging.clouds import settings as cloud_settings
from imaging.errors import ImagingError
from imaging.service.settings import Settings
from imaging.service.store import SPACE_REASON, ImageRequest
from imaging.sparse import human_bytes


@dataclass(frozen=True)
class Shortfall:
    need: int
    free: int

    def reason(self, host: str) -> str:
        return (f"{SPACE_REASON} on {host} to run it: needs about {human_bytes(self.need)} in its runs directory, "
                f"has {human_bytes(self.free)}; left for another host")  # fmt: skip


def need_bytes(settings: Settings, req: ImageRequest) -> int | None:
    """Bytes a new run of ``req`` needs in the runs directory; None when it cannot be told here."""
    if (config.runs_dir() / req.id / "request.json").exists():
        return None
    try:
        source = settings.source_of(req.instance)
    except ImagingError:
        return None  # the run says so, in one line
    if cloud_settings.is_cloud_source(source):
        return None
    try:
        src = acquire.inspect(source)
    except (ImagingError, OSError):
        return None  # a bad source fails in its run, with the run's own message
    return 2 * src.data_bytes + acquire.MARGIN


def check(settings: Settings, req: ImageRequest) -> Shortfall | None:
    """A Shortfall when this host cannot hold the run of ``req``; None when it can (or cannot tell)."""
    need = need_bytes(settings, req)
    if need is None:
        return None
    runs = config.runs_dir()
    runs.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(runs).free
    return Shortfall(need, free) if free < need else None
