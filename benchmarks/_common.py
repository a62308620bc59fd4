"""Shared helpers of the benchmarks: machine description, commit id, JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "docs" / "results"


def machine() -> dict[str, Any]:
    """CPU/GPU, cores and memory of this machine, for every figure's provenance."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0],
                            "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import torch

        from models.device import cpu_bf16_supported

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        # The same "AMD EPYC" name covers AVX2-only and AVX512-BF16 parts here, 2-4x apart in fp32/bf16
        # speed: the vector ISA torch dispatches to and native bf16 tell them apart in every figure.
        info["cpu_isa"] = torch.backends.cpu.get_cpu_capability()
        info["cpu_bf16_native"] = cpu_bf16_supported()
    except ImportError:
        info["gpu"] = None
    return info


def machine_line(m: dict[str, Any]) -> str:
    """One line naming a ``machine()`` record: CPU, its ISA and bf16 support, cores, GPU, torch."""
    isa = f" ({m['cpu_isa']}{', native bf16' if m.get('cpu_bf16_native') else ''})" if m.get("cpu_isa") else ""
    torch_version = f", torch {m['torch']}" if m.get("torch") else ""
    return f"{m.get('cpu')}{isa}, {m.get('cpu_count')} cores, GPU {m.get('gpu') or 'none'}{torch_version}"


def commit() -> str:
    """The checked-out commit (with ``-dirty`` when the tree has changes)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``payload`` + provenance to ``docs/results/<name>.json`` (or ``out``)."""
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "commit": commit(), "machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           **payload}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path
