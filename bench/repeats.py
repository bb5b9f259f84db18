"""How repeatable a host-bound step's time is, and what selective checkpointing costs the host (on the GPU).

    python bench/repeats.py repeats OUT.json   # Qwen2.5-0.5B QLoRA, selective, 8 x 1,024: measured and profiled
                                               # four times in one process, closed-form activation and region
    python bench/repeats.py host OUT.json      # Llama-Guard-3-1B LoRA and QLoRA, none and selective, 2 x 1,024:
                                               # step time, host time, the ops by host time

``timing/qlora-selective-repeats.json`` and ``timing/host-lora-selective.json`` are their outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from memtune.plan import Plan  # noqa: E402
from memtune.specs.model import resolve_model  # noqa: E402
from memtune.train import recipe  # noqa: E402
from memtune.validate.probe import measure_plan  # noqa: E402


def repeats(out: Path) -> None:
    from timing import _profile

    result = {}
    spec = resolve_model("qwen2.5-0.5b")
    plan = Plan(peft="lora", quantization="4bit", checkpointing="selective", batch_size=8, seq_len=1024)
    original = recipe._silu_into_frozen_nf4
    for variant in ("product", "region", "product", "region"):
        recipe._silu_into_frozen_nf4 = original if variant == "product" else (lambda mlp: False)
        try:
            m = measure_plan(spec, plan, steps=5)
            p = _profile(spec, plan)
        finally:
            recipe._silu_into_frozen_nf4 = original
        result.setdefault(variant, []).append({
            "step_time_s": m["step_time_s"], "host_enqueue_s": m["host_enqueue_s"], "phase_times_s": m["phase_times_s"],
            "profile": {k: p[k] for k in ("wall_s", "host_enqueue_s", "gpu_kernel_s", "kernel_launches", "aten_calls",
                                          "top_host", "top_gpu")}})
        print(variant, m["step_time_s"], p["wall_s"], p["kernel_launches"], flush=True)
    out.write_text(json.dumps(result, indent=1))


def host(out: Path) -> None:
    from timing import warmed_up
    from torch.profiler import ProfilerActivity, profile

    rows = []
    spec = resolve_model("llama-guard-3-1b")
    for quantization in ("4bit", "none"):
        for checkpointing in ("none", "selective"):
            plan = Plan(peft="lora", quantization=quantization, checkpointing=checkpointing, batch_size=2,
                        seq_len=1024)
            m = measure_plan(spec, plan, steps=5)
            model, optimizer, batch = warmed_up(spec, plan, steps=3)
            start = time.perf_counter()
            for _ in range(3):
                recipe.train_step(model, optimizer, batch, plan)
            host_s = (time.perf_counter() - start) / 3
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                recipe.train_step(model, optimizer, batch, plan)
                torch.cuda.synchronize()
            events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            rows.append({"quantization": quantization, "checkpointing": checkpointing, "step_time_s": m["step_time_s"],
                         "host_s": host_s, "total_calls": sum(e.count for e in events),
                         "top_self": [[e.key[:90], e.count, round(e.self_cpu_time_total / 1e3, 2)]
                                      for e in events[:45]]})
            print(quantization, checkpointing, m["step_time_s"], host_s, flush=True)
            del model, optimizer, batch
            torch.cuda.empty_cache()
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("repeats", "host"))
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    {"repeats": repeats, "host": host}[args.what](args.out)
