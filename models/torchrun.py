"""How a training run is spread over processes and machines: ``torchrun``'s options and command line.

Light (no torch import), so the CLI can validate ``--nproc-per-node`` and friends before loading torch;
the processes themselves are in :mod:`models.distributed` and :mod:`models.launch`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchOptions:
    """How many processes train and where: ``torchrun``'s own flags, under their own names.

    One machine: ``nproc_per_node`` ranks with a private rendezvous (``--standalone``). Several
    machines: the same command on each with ``nnodes``, a shared ``rdzv_endpoint`` (host:port of the
    first machine, which hosts torchrun's c10d rendezvous store) and ``rdzv_id``; torchrun assigns the
    node ranks.
    """

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    rdzv_id: str = "cxrsynth"

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be at least 1 (got {self.nproc_per_node})")
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be at least 1 (got {self.nnodes})")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("several machines need rdzv_endpoint (host:port of the first machine)")

    @property
    def world_size(self) -> int:
        """Ranks over all machines."""
        return self.nproc_per_node * self.nnodes

    @property
    def distributed(self) -> bool:
        """True when the run needs torchrun (more than one rank)."""
        return self.world_size > 1


def torchrun_command(options: LaunchOptions, target: Sequence[str]) -> list[str]:
    """The ``python -m torch.distributed.run ...`` argv that starts ``target`` (``-m module args...``) on every rank.

    ``--max-restarts 0``: a failed rank fails the run at once (the caller resumes from the checkpoint);
    torchrun stops the other ranks and reports the failed one.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(options.nproc_per_node),
           "--max-restarts", "0"]
    if options.nnodes == 1 and not options.rdzv_endpoint:
        cmd.append("--standalone")
    else:
        cmd += ["--nnodes", str(options.nnodes), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", str(options.rdzv_endpoint), "--rdzv-id", options.rdzv_id]
    return cmd + list(target)
