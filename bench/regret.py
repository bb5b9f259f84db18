"""Regret of the planner: measure the throughput of the top candidates on a capped H200 and compare the chosen
plan with the best measured one.

    python bench/regret.py OUT.json [--top 4] [--cases 0,1]   # on a GPU machine (the 2-GPU case needs two)
    python bench/regret.py OUT.json --from-log regret.log [--per-micro-batch]   # rebuild OUT.json from a log

OUT.json is rewritten after every case. ``--from-log`` re-runs the (deterministic) planner for each case the log
finished and pairs its candidates with the measured lines of the log by label: for a run cut off before it wrote
its JSON. ``--per-micro-batch``: the log's tokens/s counted one micro-batch per step (``memtune validate`` before it
counted gradient accumulation); they are multiplied by the plan's ``grad_accum`` and the logged value is kept.
"""

from __future__ import annotations

import argparse
import json
import re
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
    ap.add_argument("--cases", default="", help="comma-separated indices into CASES (default: all)")
    ap.add_argument("--from-log", default=None, help="rebuild OUT.json from this log of an earlier run")
    ap.add_argument("--per-micro-batch", action="store_true",
                    help="the log's tokens/s counted one micro-batch per step: multiply by grad_accum")
    args = ap.parse_args()
    if args.from_log:
        Path(args.out).write_text(json.dumps(from_log(Path(args.from_log), args.per_micro_batch), indent=2) + "\n")
        return
    import torch

    chosen_cases = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
    results = []
    for label, plan_args, gpus in chosen_cases:
        if gpus > torch.cuda.device_count():
            print(f"skipped (needs {gpus} GPUs): {label}", flush=True)
            continue
        plan = _plan(plan_args)
        gpu = plan_args[plan_args.index("--gpu") + 1]
        measured = []
        for c in _fitting(plan)[:args.top]:
            p = c["plan"]
            cli = ["--model", plan_args[1], "--emulate-gpu", gpu, "--steps", "5", "--json", *validate_options(p)]
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "memtune", "validate", *cli], capture_output=True, text=True)
            record = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {"error": proc.stderr[-500:]}
            ranks = record.get("ranks") or [{}]
            measured.append({"label": c["label"], "plan": p, "estimated_tokens_per_s": c["cost"]["tokens_per_s"],
                             "measured_tokens_per_s": None if record.get("oom") else ranks[0].get("tokens_per_s"),
                             "verdict": record.get("verdict", record.get("error")),
                             "wall_s": round(time.time() - t0, 1),
                             **{k: record.get(k) for k in ("estimated_peak_allocated_bytes",
                                                           "measured_peak_allocated_bytes")}})
            print(measured[-1]["label"], measured[-1]["measured_tokens_per_s"], measured[-1]["verdict"], flush=True)
        results.append(_case_result(label, plan, measured))
        print(label, "chosen/best measured throughput:", results[-1]["chosen_over_best_measured"], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def _plan(plan_args: list[str]) -> dict:
    return json.loads(subprocess.run([sys.executable, "-m", "memtune", "plan", *plan_args, "--json"],
                                     capture_output=True, text=True, check=True).stdout)


def _fitting(plan: dict) -> list[dict]:
    """The fitting candidates in the planner's order."""
    return sorted((c for c in plan["candidates"] if c["fits"]), key=lambda c: c["rank"])


def _case_result(label: str, plan: dict, measured: list[dict]) -> dict:
    ok = [m for m in measured if m["measured_tokens_per_s"]]
    best = max(ok, key=lambda m: m["measured_tokens_per_s"]) if ok else None
    chosen = next((m for m in measured if plan["chosen"] and m["plan"] == plan["chosen"]), None)
    ratio = (chosen["measured_tokens_per_s"] / best["measured_tokens_per_s"]
             if chosen and best and chosen["measured_tokens_per_s"] else None)
    return {"case": label, "chosen": plan["chosen"], "measured": measured, "chosen_over_best_measured": ratio}


def from_log(log: Path, per_micro_batch: bool = False) -> list[dict]:
    """Cases the log finished, re-planned here, with the log's measured tokens/s and verdicts (lines
    ``LABEL TOKENS_PER_S VERDICT`` per candidate, then ``CASE chosen/best measured throughput: R``)."""
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    ends = {label: i for label, _, _ in CASES for i, x in enumerate(lines) if x.startswith(f"{label} chosen/best")}
    results = []
    start = 0
    for label, plan_args, _ in CASES:
        if label not in ends:
            continue
        block, start = lines[start:ends[label]], ends[label] + 1
        plan = _plan(plan_args)
        by_label = {c["label"]: c for c in plan["candidates"]}
        measured = []
        for line in block:
            name = max((k for k in by_label if line.startswith(k + " ")), key=len, default=None)
            if name is None:  # measured then, not among the current planner's candidates
                m = re.match(r"^(.*?) (None|\d+\.\d+) (.*)$", line)
                if m:
                    measured.append({"label": m[1], "plan": None, "estimated_tokens_per_s": None,
                                     "measured_tokens_per_s": None if m[2] == "None" else float(m[2]),
                                     "verdict": m[3], "note": "not a candidate of the current planner"})
                continue
            c = by_label[name]
            value, verdict = line[len(name) + 1:].split(" ", 1)
            logged = None if value == "None" else float(value)
            row = {"label": name, "plan": c["plan"], "estimated_tokens_per_s": c["cost"]["tokens_per_s"],
                   "measured_tokens_per_s": logged, "verdict": verdict}
            if per_micro_batch and logged is not None and c["plan"]["grad_accum"] > 1:
                row |= {"measured_tokens_per_s": logged * c["plan"]["grad_accum"], "logged_tokens_per_s": logged}
            measured.append(row)
        results.append({**_case_result(label, plan, measured), "source": f"rebuilt from {log.name}"})
    return results


if __name__ == "__main__":
    main()
