"""How far the fast estimate (one four-layer trace after a quick warm-up, extended layer by layer) is from the
full-depth trace: the planner ranks with the fast one and confirms at full depth wherever the difference could
change the verdict (``memtune.planner.FAST_RESERVED_ERROR``).

    python bench/fast.py   # writes bench/results/fast.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ("llama-guard-3-1b", "qwen2.5-0.5b", "mistral-7b", "gemma-2-2b")
PLANS = ({}, {"checkpointing": "full"}, {"checkpointing": "selective"}, {"peft": "lora"},
         {"peft": "lora", "checkpointing": "full"}, {"peft": "lora", "quantization": "4bit"},
         {"sharding": "fsdp", "num_gpus": 4}, {"sharding": "fsdp", "num_gpus": 4, "checkpointing": "full"},
         {"grad_accum": 4})
SHAPES = ((1, 2048), (4, 1024), (2, 4096))


def main() -> None:
    from grids import plan_grid
    from memtune.estimate import estimate
    from memtune.specs import resolve_gpu

    gpu = resolve_gpu("H200-141GB")
    rows = []
    for model, spec, fields, plan in plan_grid(MODELS, PLANS, SHAPES):
        full, fast = estimate(spec, plan, gpu), estimate(spec, plan, gpu, fast=True)
        rows.append({"model": model, "plan": fields, "batch_size": plan.batch_size, "seq_len": plan.seq_len,
                     "allocated_error": fast.peak_allocated_bytes / full.peak_allocated_bytes - 1,
                     "reserved_error": fast.peak_reserved_bytes / full.peak_reserved_bytes - 1})
        print(rows[-1], flush=True)
    summary = {}
    for key in ("allocated_error", "reserved_error"):
        errors = [r[key] for r in rows]
        summary[key] = {"median_abs": statistics.median(abs(e) for e in errors), "min": min(errors),
                        "max": max(errors)}
    print(summary)
    out = {"command": "python bench/fast.py", "gpu": gpu.name, "compared": "fast estimate / full-depth estimate - 1",
           "rows_count": len(rows), "summary": summary, "rows": rows}
    (ROOT / "bench" / "results" / "fast.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
