"""torchrun entry point of ``launch``: one process per GPU (gloo processes without CUDA), one attempt of a run.

    torchrun --nproc-per-node N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] -m memtune.launch.worker JOB.json

Each rank writes ``.outcome-rank<R>.json`` next to the job. A rank that runs out of memory reports it and exits at
once (the others are waiting for it in a collective; torchrun then stops them), so the supervisor can restart from
the last checkpoint with the next plan.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from memtune.train.loop import Job, Outcome, run_attempt
from memtune.train.distributed import init_worker

OOM_EXIT = 3


def _mesh(job: Job, device: torch.device):
    plan = job.plan
    if plan.sharding == "hsdp":
        return init_device_mesh(device.type, (plan.nodes, plan.num_gpus), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (dist.get_world_size(),))


def main(job_path: str) -> None:
    job = Job.from_json(json.loads(Path(job_path).read_text()))
    rank, device = init_worker()
    report = Path(job.output_dir) / f".outcome-rank{rank}.json"
    try:
        outcome = run_attempt(job, device=device, mesh=_mesh(job, device), rank=rank,
                              world_size=dist.get_world_size())
    except Exception as e:
        report.write_text(json.dumps(Outcome(status="failed", at_step=0, message=f"{type(e).__name__}: {e}").to_json()))
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    report.write_text(json.dumps(outcome.to_json()))
    if outcome.status == "oom":
        sys.stdout.flush()
        os._exit(OOM_EXIT)  # the other ranks wait in a collective: no clean shutdown of the process group
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
