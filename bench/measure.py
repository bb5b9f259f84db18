"""Measure the accuracy grid on the local GPU(s); one JSON line per configuration.

Single GPU:  python bench/measure.py --grid single --out results.jsonl [--shard 0/2]
FSDP:        torchrun --nproc-per-node 2 bench/measure.py --grid fsdp2 --out results.jsonl
Knobs:       torchrun --nproc-per-node 1 bench/measure.py --grid knobs --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from grids import GRIDS  # noqa: E402
from memtune.plan import Plan  # noqa: E402
from memtune.specs.model import resolve_model  # noqa: E402
from memtune.validate.probe import measure_plan  # noqa: E402


def versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "gpu_name": torch.cuda.get_device_name()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", choices=sorted(GRIDS), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th configuration starting at i")
    ap.add_argument("--match", default="", help="only the configurations whose JSON contains this text")
    args = ap.parse_args()
    index, count = (int(x) for x in args.shard.split("/"))

    distributed = "RANK" in os.environ
    mesh = None
    if distributed:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    rank = int(os.environ.get("RANK", 0))
    # cuBLAS workspaces live in PyTorch's pool once created; create them before measuring anything.
    a = torch.randn(256, 256, device="cuda", requires_grad=True)
    (a @ a).sum().backward()
    del a
    torch.cuda.synchronize()
    workspace = torch.cuda.memory_allocated()
    info = versions()
    grid = [c for c in GRIDS[args.grid]()[index::count] if args.match in json.dumps(c)]
    out = open(args.out, "a") if rank == 0 else None
    for cfg in grid:
        spec = resolve_model(cfg["model"])
        plan = Plan.from_dict(cfg["plan"])
        t0 = time.time()
        try:
            row = measure_plan(spec, plan, mesh=mesh)
        except Exception as e:  # noqa: BLE001 - one broken configuration must not end the grid
            row = {"error": type(e).__name__, "message": str(e)[:500], "measured_peak_allocated_bytes": 0}
        row.update(model=cfg["model"], plan=plan.to_dict(), num_gpus=plan.world_size, rank=rank,
                   workspace_bytes_before=workspace, wall_s=round(time.time() - t0, 2), **info)
        if distributed:
            import torch.distributed as dist

            rows = [None] * dist.get_world_size()
            dist.all_gather_object(rows, row)
            if rank == 0:
                row = max(rows, key=lambda r: r.get("measured_peak_allocated_bytes", 0))
                row["per_rank_peak_allocated_bytes"] = [r.get("measured_peak_allocated_bytes") for r in rows]
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(cfg["model"], cfg["plan"], row.get("error", ""), row.get("message", "")[:200],
                  round(row["measured_peak_allocated_bytes"] / 2**30, 3),
                  "GiB", row["wall_s"], "s", flush=True)
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
