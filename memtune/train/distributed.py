"""torchrun for validate and launch: the command line that starts the workers, and a worker's process group."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, kw_only=True, slots=True)
class Torchrun:
    """Where this node sits in a multi-node run (torchrun's options of the same names)."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    """host:port of node 0."""

    def __post_init__(self) -> None:
        from memtune.errors import ConfigError

        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be at least 1, not {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank must be between 0 and {self.nnodes - 1} (--nnodes {self.nnodes}), "
                              f"not {self.node_rank}")


def torchrun_command(module: str, args: list[str], nproc: int, where: Torchrun = Torchrun()) -> list[str]:
    """``python -m torch.distributed.run`` starting ``nproc`` processes of ``python -m MODULE ARGS`` on this node:
    standalone on one node, else joining the rendezvous of ``where``; no restarts (an attempt that fails is the
    caller's to handle)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--max-restarts=0"]
    if where.nnodes == 1 and where.rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={where.nnodes}", f"--node-rank={where.node_rank}"]
        if where.rdzv_endpoint:
            cmd.append(f"--rdzv-endpoint={where.rdzv_endpoint}")
    return [*cmd, "-m", module, *args]


def init_worker() -> tuple[int, torch.device]:
    """(rank, device) of this torchrun process, with its process group: NCCL on its GPU, gloo on the CPU."""
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, device
