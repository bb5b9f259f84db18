"""Measure what the cost model assumes for FSDP2 CPU offload: the host<->device copy rate (``host_link_gbs`` in the
GPU table), the rate a CPU AdamW step streams bytes at (``CPU_OPTIMIZER_GBS``), and whole offloaded steps against the
cost model.

    python bench/offload.py OUT.json          # on a GPU machine
    python bench/offload.py OUT.json --merge MEASURED.json --compare bench/results/raw/knobs.jsonl

``--compare`` (no GPU needed) sets the offloaded steps the accuracy grid measured (``knobs`` grid, one GPU) against
``step_cost``, and gives the CPU rate each implies: the bytes ``offload_cpu_bytes`` counts for the CPU side over what
is left of the measured step after the estimated compute and copies. ``--merge`` keeps the rates of an earlier run.

Part 1 times pinned-memory copies (512 MiB, both ways) with CUDA events. Part 2 times ``torch.optim.AdamW``
(foreach, the default FSDP2's offloaded optimizer runs) over CPU tensors of 250 M elements in bf16 and fp32 and
converts the time into the bytes ``memtune.planner.cost.cpu_step_bytes_per_weight`` counts for it. Part 3 runs
``memtune validate`` on Llama-Guard-3-1B with FSDP2 on one GPU, with and without offload, and records measured tokens/s against
``memtune.planner.cost.step_cost``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

COPY_BYTES = 512 * 2**20
ADAM_NUMEL = 250_000_000
VALIDATE_PLANS = [
    ["--precision", "bf16", "--sharding", "fsdp", "--batch-size", "2", "--seq-len", "2048"],
    ["--precision", "bf16", "--sharding", "fsdp", "--offload", "--batch-size", "2", "--seq-len", "2048"],
    ["--precision", "bf16", "--sharding", "fsdp", "--offload", "--checkpointing", "full", "--batch-size", "8",
     "--seq-len", "2048"],
]


def copy_rates() -> dict:
    host = torch.empty(COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    rates = {}
    for name, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
        times = []
        for _ in range(6):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        rates[f"{name}_gbs"] = COPY_BYTES / statistics.median(times[1:]) / 1e9
    return rates


def adamw_rates() -> dict:
    from memtune.plan import Plan
    from memtune.planner.cost import CPU_OPTIMIZER_GBS, cpu_step_bytes_per_weight

    rows = {}
    for dtype, pbytes in ((torch.bfloat16, 2), (torch.float32, 4)):
        param = torch.nn.Parameter(torch.randn(ADAM_NUMEL, dtype=dtype))
        param.grad = torch.randn_like(param)
        opt = torch.optim.AdamW([param], lr=1e-5, foreach=True)
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times[1:])
        counted = ADAM_NUMEL * cpu_step_bytes_per_weight(Plan(precision="fp32" if pbytes == 4 else "bf16"))
        rows[str(dtype).removeprefix("torch.")] = {"step_s": seconds, "counted_gbs": counted / seconds / 1e9,
                                                    "assumed_gbs": CPU_OPTIMIZER_GBS}
        del opt, param
    return {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), **rows}


def offloaded_steps() -> list[dict]:
    from memtune.plan import Plan
    from memtune.planner.cost import offload_s, step_cost
    from memtune.specs import resolve_gpu, resolve_model

    spec, gpu = resolve_model("llama-guard-3-1b"), resolve_gpu("H200-141GB")
    rows = []
    for options in VALIDATE_PLANS:
        cli = [sys.executable, "-m", "memtune", "validate", "--model", "llama-guard-3-1b", "--gpu", "H200-141GB",
               "--steps", "6", "--json", *options]
        proc = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
        if not proc.stdout.strip().startswith("{"):
            rows.append({"options": options, "error": proc.stderr[-800:]})
            continue
        record = json.loads(proc.stdout)
        plan = Plan.from_dict(record["plan"])
        cost = step_cost(spec, plan, gpu)
        measured = (record.get("ranks") or [{}])[0].get("tokens_per_s")
        rows.append({"options": options, "plan": record["plan"], "verdict": record.get("verdict"),
                     "measured_tokens_per_s": measured, "estimated_tokens_per_s": cost.tokens_per_s,
                     "estimated_offload_s": offload_s(spec, plan, gpu), "estimated_step_s": cost.step_time_s,
                     "measured_step_s": plan.batch_size * plan.seq_len * plan.grad_accum / measured
                     if measured else None})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def compare(rows_path: Path) -> list[dict]:
    import dataclasses

    from memtune.plan import Plan
    from memtune.planner.cost import CPU_OPTIMIZER_GBS, offload_copies_s, offload_cpu_bytes, step_cost
    from memtune.specs import resolve_gpu, resolve_model

    gpu = resolve_gpu("H200-141GB")
    rows = []
    for line in rows_path.read_text().splitlines():
        r = json.loads(line)
        if not r["plan"].get("offload") or r.get("error"):
            continue
        spec, plan = resolve_model(r["model"]), Plan.from_dict(r["plan"])
        on_gpu = step_cost(spec, dataclasses.replace(plan, offload=False), gpu).step_time_s
        copies, cpu_bytes = offload_copies_s(spec, plan, gpu), offload_cpu_bytes(spec, plan)
        estimated = step_cost(spec, plan, gpu).step_time_s
        rows.append({"model": r["model"], "plan": r["plan"], "measured_step_s": r["step_time_s"],
                     "estimated_step_s": estimated, "error": estimated / r["step_time_s"] - 1,
                     "estimated_gpu_s": on_gpu, "estimated_copies_s": copies,
                     "implied_cpu_gbs": cpu_bytes / (r["step_time_s"] - on_gpu - copies) / 1e9,
                     "cpu_optimizer_gbs": CPU_OPTIMIZER_GBS})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--compare", metavar="ROWS", help="measured rows (bench/measure.py JSONL): compare, no GPU")
    ap.add_argument("--merge", metavar="JSON", help="with --compare: start from this earlier result")
    args = ap.parse_args()
    out = Path(args.out)
    if args.compare:
        result = json.loads(Path(args.merge).read_text()) if args.merge else {}
        result["offloaded_steps"] = compare(Path(args.compare))
        result["compare_command"] = " ".join(["python", *sys.argv])
        out.write_text(json.dumps(result, indent=2) + "\n")
        return
    result = {"command": " ".join([sys.executable, *sys.argv]), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "copies": copy_rates()}
    print(json.dumps(result["copies"]), flush=True)
    result["cpu_adamw"] = adamw_rates()
    print(json.dumps(result["cpu_adamw"]), flush=True)
    result["steps"] = offloaded_steps()
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
