"""torchrun entry point of ``validate`` for multi-GPU plans: one process per GPU, each writes ``rank{N}.json``.

    torchrun --nproc-per-node N -m memtune.validate.worker JOB.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from memtune.plan import Plan
from memtune.specs.model import _spec_from_config
from memtune.validate.probe import measure_plan


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        plan = Plan.from_dict(job["plan"])
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        spec = dataclasses.replace(_spec_from_config(job["model_name"], job["model_config"]),
                                   weights_dir=job.get("weights_dir"))
        snapshot = Path(job_path).parent / f"snapshot-rank{rank}.pickle" if job.get("snapshot") else None
        result = measure_plan(spec, plan, steps=job["steps"], mesh=mesh, device=device,
                              memory_cap_bytes=job.get("memory_cap_bytes"), snapshot_path=snapshot,
                              sdpa_backend=job.get("sdpa_backend"), load_weights=job.get("weights_dir") is not None)
        result["rank"] = rank
        (Path(job_path).parent / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
