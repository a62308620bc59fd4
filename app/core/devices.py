"""The devices a worker trains multi-GPU jobs on (``worker_gpus``), read by the CLI that starts workers and by
the worker that runs such jobs (``worker/multi_gpu.py``); light, no torch."""

from __future__ import annotations

from dataclasses import dataclass

from app.core.config import Settings

LEASED_GPU_ENV = "CXRSYNTH_LEASED_GPU"  # set by `cxrsynth worker --gpus` on each per-GPU process


@dataclass(frozen=True)
class WorkerDevices:
    """What ``worker_gpus`` gives this process: ``cuda`` device ids, or ``cpu`` with a count of ranks."""

    kind: str
    ids: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.ids)


def worker_devices(settings: Settings) -> WorkerDevices:
    """Parse ``worker_gpus``: ``0,1,2,3`` (GPU ids), ``cpu:N`` (N CPU ranks) or empty (none)."""
    text = settings.worker_gpus.strip()
    if not text:
        return WorkerDevices("none", ())
    if text.startswith("cpu:"):
        n = int(text.removeprefix("cpu:"))
        if n < 1:
            raise ValueError(f"worker_gpus={text!r}: cpu:N needs N >= 1")
        return WorkerDevices("cpu", tuple(str(i) for i in range(n)))
    ids = tuple(g.strip() for g in text.split(",") if g.strip())
    if not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"worker_gpus={text!r}: expected distinct GPU ids like 0,1,2,3 or cpu:N")
    return WorkerDevices("cuda", ids)
