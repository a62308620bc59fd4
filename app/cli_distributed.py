"""The ``--nproc-per-node`` family of options of ``train-generator`` and ``pretrain``: the same run on several
processes through ``torchrun`` (:mod:`models.launch`), its progress on this command's bar.

The flags are torchrun's own, under its own names: ``--nproc-per-node`` ranks on this machine; for several
machines the same command on each with ``--nnodes`` and ``--rdzv-endpoint HOST:PORT`` (the first machine)
and ``--rdzv-id``. The checkpoint folder must be one every rank sees (see :mod:`models.distributed`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer

from app.cli_common import fail
from models.callbacks import OnStep
from models.torchrun import LaunchOptions

NprocOpt = Annotated[int, typer.Option(
    "--nproc-per-node", help="Processes (ranks) on this machine, one per GPU: data-parallel training with torchrun "
                             "(DDP; gloo on CPU). --batch-size stays the global batch.")]
NnodesOpt = Annotated[int, typer.Option("--nnodes", help="Machines in the run (the same command on each).")]
RdzvEndpointOpt = Annotated[str | None, typer.Option(
    "--rdzv-endpoint", help="HOST:PORT of the first machine (torchrun's c10d rendezvous), with --nnodes > 1.")]
RdzvIdOpt = Annotated[str, typer.Option("--rdzv-id", help="Name of the run, the same on every machine.")]


def launch_options(nproc_per_node: int, nnodes: int, rdzv_endpoint: str | None, rdzv_id: str,
                   batch_size: int) -> LaunchOptions:
    """The validated torchrun options (a readable error and exit 2 for impossible ones, or for a global
    ``batch_size`` the ranks cannot share evenly)."""
    try:
        options = LaunchOptions(nproc_per_node=nproc_per_node, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                                rdzv_id=rdzv_id)
    except ValueError as exc:
        fail(str(exc))
    if batch_size % options.world_size:
        fail(f"--batch-size {batch_size} is the global batch: it must be a multiple of the {options.world_size} "
             "ranks (each rank takes an equal share)")
    return options


def run_distributed(task: str, options: LaunchOptions, *, data: str | Path, out: Path, config: dict[str, Any],
                    ckpt: Path, resume: bool, device: str, on_step: OnStep, init_from: Path | None = None,
                    notes: str = "") -> SimpleNamespace | None:
    """Run one training call on ``options.world_size`` ranks; rank 0's result (``steps``, ``wall_seconds``,
    ``final_loss``, ...), or ``None`` on a machine without rank 0. Canceled propagates; a failed rank exits 1
    with torchrun's report. The run folder (spec, progress, torchrun's log) is ``CKPT/torchrun/HOST-PID``: one per
    launching command, so the machines of a multi-machine run never overwrite each other's files even when
    the checkpoint folder is shared."""
    from models.launch import DistributedRunError, launch, make_spec

    spec = make_spec(task, data=data, out_dir=out, config=config, checkpoint_dir=ckpt, resume=resume, device=device,
                     init_from=init_from, notes=notes)
    try:
        record = launch(spec, options, ckpt / "torchrun" / f"{socket.gethostname()}-{os.getpid()}", on_step=on_step)
    except DistributedRunError as exc:
        fail(str(exc), code=1)
    return None if record is None else SimpleNamespace(**record)
