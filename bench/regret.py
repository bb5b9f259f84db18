"""Regret of the planner: the plan it chooses against every plan worth trying, all measured in one run.

    python bench/regret.py plan bench/results/regret-plans.json       # on the CPU: this commit's planner, per case
    python bench/regret.py plan --cases architectures bench/results/architectures-plans.json   # non-Llama models
    python bench/regret.py measure bench/results/regret-plans.json OUT.json [--deadline S] [--only A|B]   # on the GPU
    python bench/regret.py merge OUT.json PART.json...      # cases measured in several device runs, in plan order

``plan`` records, for each case, the plan the planner chooses and the plans to measure beside it (in the chosen
plan's precision): the ``MAX_WITHIN`` plans that fit (by their estimate) nearest to it within ``WITHIN`` of its
estimated cost, and the obvious ones - no and full checkpointing with each optimizer, each at the split of the
global batch into micro-batches the estimate likes best - with the planner's commit. ``measure`` runs each of them with ``memtune.validate.probe.measure_plan`` (the code ``memtune
validate`` runs), on the H200 itself or capped to a smaller card's memory with that card's attention kernel (then
only the ranking is checked: the speed is the H200's). A figure is what that commit's planner chose, measured.

OUT.json: ``cases``, each with ``name``, ``gpu``, ``emulated``, ``commit``, ``chosen``, ``best``,
``chosen_over_best`` (measured tokens/s of the chosen plan over the fastest measured) and every measured plan.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from provenance import commit  # noqa: E402

WITHIN = 0.25
MAX_WITHIN = 4
"""Plans within ``WITHIN`` of the chosen one's estimated cost that are measured, nearest first (one device run of
at most ten minutes holds about ten plans a case)."""
CASES = [
    # (name, model, GPU, planner options, emulated on the H200)
    ("llama-3.1-8b full FT, global 8 x 2048", "llama-3.1-8b", "H200-141GB",
     {"seq_len": 2048, "global_batch": 8, "fixed": {"peft": "none"}}, False),
    ("llama-3.2-3b full FT, global 16 x 2048", "llama-3.2-3b", "H200-141GB",
     {"seq_len": 2048, "global_batch": 16, "fixed": {"peft": "none"}}, False),
    ("llama-guard-3-1b full FT, packed 4096, global 16", "llama-guard-3-1b", "H200-141GB",
     {"seq_len": 4096, "global_batch": 16, "batching": "packing", "fixed": {"peft": "none"}}, False),
    ("llama-3.1-8b LoRA, global 8 x 2048", "llama-3.1-8b", "H200-141GB",
     {"seq_len": 2048, "global_batch": 8, "fixed": {"peft": "lora", "quantization": "none"}}, False),
    ("llama-3.1-8b QLoRA 4-bit, global 8 x 2048", "llama-3.1-8b", "H200-141GB",
     {"seq_len": 2048, "global_batch": 8, "fixed": {"peft": "lora", "quantization": "4bit"}}, False),
    ("llama-guard-3-1b full FT on L4-24GB, global 8 x 1152", "llama-guard-3-1b", "L4-24GB",
     {"seq_len": 1152, "global_batch": 8, "fixed": {"peft": "none"}}, True),
    ("llama-3.2-3b LoRA on V100-32GB, global 16 x 2048", "llama-3.2-3b", "V100-32GB",
     {"seq_len": 2048, "global_batch": 16, "fixed": {"peft": "lora", "quantization": "none"}}, True),
]
MODELS = Path("bench/assets/models")
"""Relative to the repository's root, where both stages run."""
ARCHITECTURES = [
    # Models memtune has no profile for, from their config.json: fused projections (Phi-3), GPT-NeoX's names and
    # LayerNorm (Pythia), q/k norms and tied embeddings (Qwen3), post-norms (OLMo-2), 64 experts, top-8 (OLMoE).
    ("phi-3-mini full FT, global 16 x 2048", str(MODELS / "phi-3-mini-4k"), "H200-141GB",
     {"seq_len": 2048, "global_batch": 16, "fixed": {"peft": "none"}}, False),
    ("pythia-1.4b full FT, global 16 x 2048", str(MODELS / "pythia-1.4b"), "H200-141GB",
     {"seq_len": 2048, "global_batch": 16, "fixed": {"peft": "none"}}, False),
    ("qwen3-1.7b LoRA, global 16 x 2048", str(MODELS / "qwen3-1.7b"), "H200-141GB",
     {"seq_len": 2048, "global_batch": 16, "fixed": {"peft": "lora", "quantization": "none"}}, False),
    ("olmo-2-1b QLoRA 4-bit, global 8 x 2048", str(MODELS / "olmo-2-1b"), "H200-141GB",
     {"seq_len": 2048, "global_batch": 8, "fixed": {"peft": "lora", "quantization": "4bit"}}, False),
    ("olmoe-1b-7b (MoE) full FT, global 8 x 2048", str(MODELS / "olmoe-1b-7b"), "H200-141GB",
     {"seq_len": 2048, "global_batch": 8, "fixed": {"peft": "none"}}, False),
    ("phi-3-mini LoRA on L4-24GB, global 8 x 2048", str(MODELS / "phi-3-mini-4k"), "L4-24GB",
     {"seq_len": 2048, "global_batch": 8, "fixed": {"peft": "lora", "quantization": "none"}}, True),
]
ARCHITECTURES_2 = [
    # More models without a profile, measured after the first set: sliding-window layers that give attention a mask
    # (Gemma-3: five in six layers at 512 tokens; Phi-3 at 4,096 tokens), a shared expert beside 60 routed ones
    # (Qwen1.5-MoE), GraniteMoE's own expert layers.
    ("gemma-3-1b full FT, global 16 x 4096", str(MODELS / "gemma-3-1b"), "H200-141GB",
     {"seq_len": 4096, "global_batch": 16, "fixed": {"peft": "none"}}, False),
    ("qwen1.5-moe-a2.7b (MoE) LoRA, global 8 x 2048", str(MODELS / "qwen1.5-moe-a2.7b"), "H200-141GB",
     {"seq_len": 2048, "global_batch": 8, "fixed": {"peft": "lora", "quantization": "none"}}, False),
    ("phi-3-mini QLoRA 4-bit, global 8 x 4096", str(MODELS / "phi-3-mini-4k"), "H200-141GB",
     {"seq_len": 4096, "global_batch": 8, "fixed": {"peft": "lora", "quantization": "4bit"}}, False),
    ("granite-3.0-1b-a400m (MoE) full FT, global 16 x 2048", str(MODELS / "granite-3.0-1b-a400m"), "H200-141GB",
     {"seq_len": 2048, "global_batch": 16, "fixed": {"peft": "none"}}, False),
    ("gemma-3-1b LoRA on L4-24GB, global 8 x 2048", str(MODELS / "gemma-3-1b"), "L4-24GB",
     {"seq_len": 2048, "global_batch": 8, "fixed": {"peft": "lora", "quantization": "none"}}, True),
]
CASE_SETS = {"llama": CASES, "architectures": ARCHITECTURES, "architectures-2": ARCHITECTURES_2}


def plan_cases(out: Path, cases_name: str = "llama", only: str | None = None) -> None:
    from memtune.estimate import estimate
    from memtune.planner import plan_candidates
    from memtune.specs import resolve_gpu, resolve_model

    cases = []
    for name, model, gpu_name, options, emulated in CASE_SETS[cases_name]:
        if only and only not in name:
            continue
        spec, gpu = resolve_model(model), resolve_gpu(gpu_name)
        started = time.time()
        result = plan_candidates(spec, gpu, **options)
        chosen = result.chosen
        fitting = [c for c in result.candidates if c.fits and c.cost is not None and not c.plan.offload
                   and not c.plan.expandable_segments and c.plan.precision == chosen.plan.precision]
        picked = {chosen.plan: "chosen"}
        limit = chosen.cost.gpu_seconds_per_token * (1 + WITHIN)
        close = sorted((c for c in fitting if c.cost.gpu_seconds_per_token <= limit),
                       key=lambda c: c.cost.gpu_seconds_per_token)
        for c in close[:MAX_WITHIN]:
            picked.setdefault(c.plan, f"within {WITHIN:.0%}")
        for ac in ("none", "full"):
            for optimizer in ("adamw", "adamw-fused", "adamw-8bit"):
                same = [c for c in fitting if (c.plan.checkpointing, c.plan.optimizer) == (ac, optimizer)]
                if same:  # the split of the global batch the estimate likes best
                    picked.setdefault(max(same, key=lambda c: c.cost.tokens_per_s).plan, "obvious")
        by_plan = {c.plan: c for c in fitting}
        rows = [{"why": why, "label": by_plan[p].label if p in by_plan else chosen.label, "plan": p.to_dict(),
                 "estimated_tokens_per_s": (by_plan.get(p) or chosen).cost.tokens_per_s,
                 "cost_method": (by_plan.get(p) or chosen).cost.method,
                 "estimated_peak_allocated_bytes": estimate(spec, p, gpu).peak_allocated_bytes}
                for p, why in picked.items()]
        cases.append({"name": name, "model": model, "gpu": gpu_name, "emulated": emulated, "options": options,
                      "chosen": chosen.plan.to_dict(), "plans": rows, "planning_s": round(time.time() - started, 1)})
        print(f"{name}: chosen {chosen.label}; {len(rows)} plans to measure ({time.time() - started:.0f} s)",
              flush=True)
    out.write_text(json.dumps({"commit": commit(), "within": WITHIN, "case_set": cases_name, "cases": cases},
                              indent=1) + "\n")


def measure(plans_file: Path, out: Path, deadline: float, only: str | None = None) -> None:
    import torch

    from memtune.estimate import overhead, sdpa_backend
    from memtune.plan import Plan
    from memtune.specs import resolve_gpu, resolve_model
    from memtune.validate.probe import measure_plan

    started = time.time()
    planned = json.loads(plans_file.read_text())
    results = []
    a = torch.randn(256, 256, device="cuda", requires_grad=True)
    (a @ a).sum().backward()
    command = "python bench/regret.py measure PLANS.json OUT.json" + (f" --only '{only}'" if only else "")
    for case in planned["cases"]:
        if only and not any(part in case["name"] for part in only.split("|")):
            continue
        spec, gpu = resolve_model(case["model"]), resolve_gpu(case["gpu"])
        measured = []
        for row in case["plans"]:
            if time.time() - started > deadline:
                print("deadline reached", flush=True)
                break
            plan = Plan.from_dict(row["plan"])
            cap = gpu.memory_bytes - overhead.runtime_overhead_bytes(plan.has_process_group) \
                if case["emulated"] else None
            backend = sdpa_backend(spec, plan, gpu) if case["emulated"] else None
            t0 = time.time()
            m = measure_plan(spec, plan, steps=2 if spec.num_params > 5e9 else 4, memory_cap_bytes=cap,
                             sdpa_backend=backend)
            tokens = plan.batch_size * plan.seq_len * plan.grad_accum
            peak = m.get("measured_peak_allocated_bytes")
            tokens_per_s = None if m.get("error") else tokens / m["step_time_s"]
            measured.append({**row, "measured_tokens_per_s": tokens_per_s,
                             "peak_error": peak and row.get("estimated_peak_allocated_bytes") and
                             row["estimated_peak_allocated_bytes"] / peak - 1,
                             "tokens_per_s_error": None if case["emulated"] or not tokens_per_s
                             else row["estimated_tokens_per_s"] / tokens_per_s - 1,
                             "measured_step_time_s": m.get("step_time_s"), "error": m.get("error"),
                             "measured_peak_allocated_bytes": m.get("measured_peak_allocated_bytes"),
                             "wall_s": round(time.time() - t0, 1)})
            print(f"  {row['why']:10} {row['label']}: estimated {row['estimated_tokens_per_s']:,.0f}, measured "
                  f"{measured[-1]['measured_tokens_per_s'] or 0:,.0f} tokens/s {m.get('error') or ''}", flush=True)
        ok = [r for r in measured if r["measured_tokens_per_s"]]
        chosen = next((r for r in measured if r["why"] == "chosen"), None)
        best = max(ok, key=lambda r: r["measured_tokens_per_s"]) if ok else None
        ratio = chosen["measured_tokens_per_s"] / best["measured_tokens_per_s"] \
            if chosen and best and chosen["measured_tokens_per_s"] else None
        results.append({"name": case["name"], "model": case["model"], "gpu": case["gpu"], "emulated": case["emulated"],
                        "commit": planned["commit"], "chosen": case["chosen"], "best": best and best["plan"],
                        "best_label": best and best["label"], "chosen_over_best": ratio, "measured": measured,
                        "device": torch.cuda.get_device_name(), "torch": torch.__version__})
        print(f"{case['name']}: chosen/best {ratio}", flush=True)
        out.write_text(json.dumps({"command": command, "cases": results}, indent=1) + "\n")


def merge(out: Path, parts: list[Path], plans_file: Path) -> None:
    """The cases of several ``measure`` runs of one plans file, in that file's order, with each run's command."""
    planned = [c["name"] for c in json.loads(plans_file.read_text())["cases"]]
    loaded = [json.loads(p.read_text()) for p in parts]
    cases = {c["name"]: c for part in loaded for c in part["cases"]}
    out.write_text(json.dumps({"command": "; ".join(part["command"] for part in loaded),
                               "cases": [cases[n] for n in planned if n in cases]}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("plan")
    p.add_argument("out", type=Path)
    p.add_argument("--cases", choices=sorted(CASE_SETS), default="llama")
    p.add_argument("--only", help="the cases whose name contains this")
    m = sub.add_parser("measure")
    m.add_argument("plans", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--deadline", type=float, default=1e9)
    m.add_argument("--only", help="the cases whose name holds one of these texts ('8b LoRA|L4')")
    g = sub.add_parser("merge")
    g.add_argument("out", type=Path)
    g.add_argument("parts", type=Path, nargs="+")
    g.add_argument("--plans", type=Path, default=Path("bench/results/regret-plans.json"))
    args = ap.parse_args()
    if args.what == "plan":
        plan_cases(args.out, args.cases, args.only)
    elif args.what == "measure":
        measure(args.plans, args.out, args.deadline, args.only)
    else:
        merge(args.out, args.parts, args.plans)


if __name__ == "__main__":
    main()
