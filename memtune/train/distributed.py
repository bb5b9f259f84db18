"""The process group of a torchrun worker (validate's and launch's)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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
