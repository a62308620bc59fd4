"""Atomic files and folders: training-state checkpoints of every resumable loop (generator training, SSL
pretraining) and exported model folders (generators, encoders), never visible half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint_atomic(payload: dict[str, Any], checkpoint_dir: str | Path) -> Path:
    """Write ``checkpoint.pt`` via a temporary file, fsync and ``os.replace`` (never half-written).

    In a ``torch.distributed`` run only rank 0 writes (the others hold the same global state); the path
    is returned on every rank.
    """
    d = Path(checkpoint_dir)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return d / CHECKPOINT_NAME
    d.mkdir(parents=True, exist_ok=True)
    final = d / CHECKPOINT_NAME
    tmp = d / f".{CHECKPOINT_NAME}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    with open(tmp, "rb") as fh:  # flush to disk before the rename makes it visible
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


def read_checkpoint(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Load ``checkpoint.pt`` to CPU; ``FileNotFoundError`` when there is none."""
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # weights_only=False: the checkpoint holds numpy / python RNG states, and it is our own file.
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state


@contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``out_dir`` in one rename.

    A reader (the worker loading a generator, a download) sees the old folder or the new one, never a
    partial export; on error the temporary folder is removed and ``out_dir`` is left untouched. The
    folder is made world-readable (``mkdtemp`` creates it 0700): exported models are read by other users.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
