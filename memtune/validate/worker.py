"""torchrun entry point of ``validate`` for multi-GPU plans: one process per GPU, each writes ``rank{N}.json``.

    torchrun --nproc-per-node N -m memtune.validate.worker JOB.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from memtune.plan import Plan
from memtune.specs.model import spec_from_config
from memtune.train.distributed import init_worker
from memtune.validate.probe import measure_plan


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    rank, device = init_worker()
    try:
        plan = Plan.from_dict(job["plan"])
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        spec = dataclasses.replace(spec_from_config(job["model_name"], job["model_config"]),
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
