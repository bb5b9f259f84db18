"""How close the closed-form screen (``memtune.estimate.screen``) comes to the trace, on a grid of architectures
and plans: the planner screens every candidate and traces only those near the GPU's limit, so the screen's error
sets how wide that band must be, per class of plans (``screen_band``).

    python bench/screen.py   # writes bench/results/screen.json and profiles/screen_bands.json
    python bench/screen.py --architectures   # models without a profile (bench/assets/models) against those bands
                                             # (bench/results/screen-architectures.json), which then widen to
                                             # cover them too
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ("llama-guard-3-1b", "qwen2.5-0.5b", "gemma-2-2b", "mistral-7b", "llama-3.1-8b")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PLANS = ({}, {"precision": "fp32"}, {"precision": "amp-bf16"}, {"peft": "lora"},
         {"peft": "lora", "lora_targets": ALL_TARGETS}, {"peft": "lora", "quantization": "4bit"},
         {"peft": "lora", "quantization": "8bit"}, {"checkpointing": "full"}, {"checkpointing": "selective"},
         {"peft": "lora", "checkpointing": "full"}, {"peft": "lora", "checkpointing": "selective"},
         {"attention": "eager"}, {"sharding": "fsdp", "num_gpus": 8}, {"sharding": "fsdp", "num_gpus": 8, "peft": "lora"},
         {"sharding": "fsdp-grad-op", "num_gpus": 8}, {"sharding": "fsdp", "offload": True},
         {"sharding": "fsdp", "num_gpus": 8, "offload": True, "checkpointing": "full"},
         {"expandable_segments": True}, {"optimizer": "adamw-fused"}, {"optimizer": "adamw-8bit"},
         {"grad_accum": 4},
         # every class of plan_class across sharding: checkpointing under FSDP2, full and LoRA; QLoRA checkpointed
         {"checkpointing": "selective", "sharding": "fsdp", "num_gpus": 8},
         {"checkpointing": "full", "sharding": "fsdp", "num_gpus": 8},
         {"peft": "lora", "checkpointing": "selective", "sharding": "fsdp", "num_gpus": 8},
         {"peft": "lora", "checkpointing": "full", "sharding": "fsdp", "num_gpus": 8},
         {"peft": "lora", "quantization": "4bit", "checkpointing": "selective"},
         {"peft": "lora", "quantization": "4bit", "checkpointing": "full"},
         {"precision": "amp-bf16", "checkpointing": "full"},
         {"sharding": "fsdp", "offload": True, "checkpointing": "selective"},
         # LLM.int8 checkpointed: what bitsandbytes keeps through checkpointing
         {"peft": "lora", "quantization": "8bit", "checkpointing": "full"},
         {"peft": "lora", "quantization": "8bit", "checkpointing": "selective"})
SHAPES = ((1, 1024), (2, 4096))
ARCHITECTURE_PLANS = ({}, {"peft": "lora"}, {"peft": "lora", "quantization": "4bit"}, {"checkpointing": "full"},
                      {"checkpointing": "selective"}, {"peft": "lora", "checkpointing": "selective"})
ARCHITECTURE_SHAPES = ((1, 1024), (4, 2048))


def architectures() -> None:
    """The screen against the fast trace for the models in ``bench/assets/models`` (LoRA on each model's default
    targets), checked against the bands the main grid set; then each class's band widens to cover these too, so
    the bands hold every architecture measured (run it after the main grid, which rewrites them)."""
    import dataclasses

    from grids import plan_grid
    from memtune.estimate import estimate
    from memtune.estimate.screen import plan_class, screen, screen_band
    from memtune.specs import resolve_gpu
    from memtune.specs.model import default_lora_targets

    gpu = resolve_gpu("H200-141GB")
    models = [str(p.parent.relative_to(ROOT) / "config.json")
              for p in sorted((ROOT / "bench/assets/models").glob("*/config.json"))]
    rows = []
    for model, spec, fields, plan in plan_grid(models, ARCHITECTURE_PLANS, ARCHITECTURE_SHAPES):
        if plan.peft == "lora":
            plan = dataclasses.replace(plan, lora_targets=default_lora_targets(spec))
        error = screen(spec, plan, gpu).required_bytes / estimate(spec, plan, gpu, fast=True).required_bytes - 1
        under, over = screen_band(plan)
        rows.append({"model": model, "plan": fields, "class": plan_class(plan), "batch_size": plan.batch_size,
                     "seq_len": plan.seq_len, "error": error, "within_band": -under <= error <= over})
        print(model, fields, plan.batch_size, plan.seq_len, f"{100 * error:+.1f} %", flush=True)
    errors = [r["error"] for r in rows]
    summary = {"rows": len(rows), "median_abs_error": statistics.median(abs(e) for e in errors),
               "max_over": max(errors), "max_under": min(errors),
               "within_band": sum(r["within_band"] for r in rows) / len(rows)}
    print(summary)
    bands_path = ROOT / "profiles" / "screen_bands.json"
    bands = json.loads(bands_path.read_text())
    for r in rows:
        under, over = bands["bands"].get(r["class"], [0.0, 0.0])
        bands["bands"][r["class"]] = [round(max(under, -r["error"]), 4), round(max(over, r["error"]), 4)]
        bands.setdefault("architecture_rows", {})
        bands["architecture_rows"][r["class"]] = bands["architecture_rows"].get(r["class"], 0) + 1
    bands["command"] = "python bench/screen.py; python bench/screen.py --architectures"
    bands_path.write_text(json.dumps(bands, indent=1) + "\n")
    (ROOT / "bench" / "results" / "screen-architectures.json").write_text(json.dumps(
        {"command": "python bench/screen.py --architectures", "gpu": gpu.name,
         "compared": "required bytes, screen vs fast trace, against profiles/screen_bands.json",
         "summary": summary, "rows": rows}, indent=1) + "\n")


def main() -> None:
    if "--architectures" in sys.argv[1:]:
        return architectures()
    from grids import plan_grid
    from memtune.errors import InvalidPlanError
    from memtune.estimate import estimate
    from memtune.estimate.screen import SCREEN_BAND, plan_class, screen
    from memtune.specs import resolve_gpu

    gpu = resolve_gpu("H200-141GB")
    rows, untraced = [], []
    for model, spec, fields, plan in plan_grid(MODELS, PLANS, SHAPES):
        try:
            traced = estimate(spec, plan, gpu, fast=True)
        except InvalidPlanError as e:  # e.g. an attention kernel this transformers refuses for the architecture
            untraced.append({"model": model, "plan": fields, "reason": str(e)[:160]})
            continue
        screened = screen(spec, plan, gpu)
        rows.append({"model": model, "plan": fields, "class": plan_class(plan), "batch_size": plan.batch_size,
                     "seq_len": plan.seq_len,
                     "traced_required_bytes": traced.required_bytes,
                     "screened_required_bytes": screened.required_bytes,
                     "error": screened.required_bytes / traced.required_bytes - 1})
        print(model, fields, plan.batch_size, plan.seq_len, f"{100 * rows[-1]['error']:+.1f} %", flush=True)
    errors = [r["error"] for r in rows]
    summary = {"rows": len(rows), "median_abs_error": statistics.median(abs(e) for e in errors),
               "max_over": max(errors), "max_under": min(errors),
               "within_band": sum(abs(e) <= SCREEN_BAND for e in errors) / len(errors), "band": SCREEN_BAND}
    print(summary)
    out = {"command": "python bench/screen.py", "gpu": gpu.name,
           "compared": "required bytes (reserved pool + runtime), screen vs fast trace", "summary": summary,
           "rows": rows, "not_traced_here": untraced}
    (ROOT / "bench" / "results" / "screen.json").write_text(json.dumps(out, indent=1) + "\n")
    # per class: the largest under- and over-estimate (fractions of the trace), which the planner widens by
    # BAND_MARGIN to decide which plans the screen settles alone
    bands = {}
    for r in rows:
        under, over = bands.get(r["class"], (0.0, 0.0))
        bands[r["class"]] = (max(under, -r["error"]), max(over, r["error"]))
    (ROOT / "profiles" / "screen_bands.json").write_text(json.dumps(
        {"command": "python bench/screen.py", "compared": out["compared"], "gpu": gpu.name,
         "bands": {k: [round(u, 4), round(o, 4)] for k, (u, o) in sorted(bands.items())},
         "rows": {k: sum(r["class"] == k for r in rows) for k in sorted(bands)}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
