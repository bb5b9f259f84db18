"""Regret of the planner: measure the throughput of the top candidates on a capped H200 and compare the chosen
plan with the best measured one.

    python bench/regret.py OUT.json [--top 4]   # on a GPU machine (the 2-GPU case needs two)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CASES = [
    # (label, plan arguments, GPUs the case needs): the seed case's full fine-tune, packed to 4,096 tokens
    ("llama-guard-3-1b full FT on L4-24GB, packing 4096",
     ["--model", "llama-guard-3-1b", "--gpu", "L4-24GB", "--seq-len", "4096", "--batching", "packing",
      "--peft", "none"], 1),
    ("llama-guard-3-1b full FT on V100-32GB, packing 4096",
     ["--model", "llama-guard-3-1b", "--gpu", "V100-32GB", "--seq-len", "4096", "--batching", "packing",
      "--peft", "none"], 1),
    ("llama-3.2-3b on L4-24GB, global batch 16 x 2048",
     ["--model", "llama-3.2-3b", "--gpu", "L4-24GB", "--seq-len", "2048", "--global-batch", "16"], 1),
    ("llama-guard-3-1b full FT on 2 x V100-32GB, packing 4096",
     ["--model", "llama-guard-3-1b", "--gpu", "V100-32GB", "--num-gpus", "2", "--seq-len", "4096",
      "--batching", "packing", "--peft", "none"], 2),
]
PLAN_OPTIONS = ("precision", "sharding", "num_gpus", "checkpointing", "peft", "quantization", "optimizer",
                "batch_size", "seq_len", "attention", "grad_accum", "offload", "expandable_segments")


def validate_options(plan: dict) -> list[str]:
    """``memtune validate`` options that reproduce ``plan`` (a plan's JSON object)."""
    cli = []
    for key in PLAN_OPTIONS:
        flag = "--" + key.replace("_", "-")
        if isinstance(plan[key], bool):
            cli.append(flag if plan[key] else "--no-" + key.replace("_", "-"))
        else:
            cli += [flag, str(plan[key])]
    return cli


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--top", type=int, default=4)
    args = ap.parse_args()
    import torch

    results = []
    for label, plan_args, gpus in CASES:
        if gpus > torch.cuda.device_count():
            print(f"skipped (needs {gpus} GPUs): {label}", flush=True)
            continue
        plan = json.loads(subprocess.run([sys.executable, "-m", "memtune", "plan", *plan_args, "--json"],
                                         capture_output=True, text=True, check=True).stdout)
        gpu = plan_args[plan_args.index("--gpu") + 1]
        fitting = sorted((c for c in plan["candidates"] if c["fits"]), key=lambda c: c["cost"]["gpu_seconds_per_token"])
        measured = []
        for c in fitting[:args.top]:
            p = c["plan"]
            cli = ["--model", plan_args[1], "--emulate-gpu", gpu, "--steps", "5", "--json", *validate_options(p)]
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "memtune", "validate", *cli], capture_output=True, text=True)
            record = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {"error": proc.stderr[-500:]}
            ranks = record.get("ranks") or [{}]
            measured.append({"label": c["label"], "plan": p, "estimated_tokens_per_s": c["cost"]["tokens_per_s"],
                             "measured_tokens_per_s": None if record.get("oom") else ranks[0].get("tokens_per_s"),
                             "verdict": record.get("verdict", record.get("error")), "wall_s": round(time.time() - t0, 1)})
            print(measured[-1]["label"], measured[-1]["measured_tokens_per_s"], measured[-1]["verdict"], flush=True)
        ok = [m for m in measured if m["measured_tokens_per_s"]]
        best = max(ok, key=lambda m: m["measured_tokens_per_s"]) if ok else None
        chosen = next((m for m in measured if plan["chosen"] and m["plan"] == plan["chosen"]), None)
        ratio = (chosen["measured_tokens_per_s"] / best["measured_tokens_per_s"]
                 if chosen and best and chosen["measured_tokens_per_s"] else None)
        results.append({"case": label, "chosen": plan["chosen"], "measured": measured,
                        "chosen_over_best_measured": ratio})
        print(label, "chosen/best measured throughput:", ratio, flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
