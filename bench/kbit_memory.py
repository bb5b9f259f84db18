"""Peak memory of k-bit steps: the estimate against the allocator's peak measured in the step-time runs.

    python bench/kbit_memory.py OUT.json [--quantization 8bit]

Every LLM.int8 (or NF4) plan measured by ``bench/timing.py grid`` (the grid and its out-of-sample sets, on the
H200: ``measured_peak_allocated_bytes``) estimated by this commit. OUT.json: ``commit``, per plan the error
(estimate / measured - 1), and ``median_abs_err`` / ``max_abs_err`` over the grid and over the out-of-sample sets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import commit  # noqa: E402

TIMING = Path(__file__).resolve().parent / "results/timing"
SETS = {"grid": ["grid-probe2.jsonl"], "oos": ["oos.jsonl"], "oos-2": ["oos-2.jsonl"], "oos-3": ["oos-3.jsonl"],
        "oos-4": ["oos-4.jsonl"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--quantization", choices=("8bit", "4bit"), default="8bit")
    args = ap.parse_args()
    from step_time import load_rows, traced

    from memtune.estimate import estimate

    rows = []
    for name, files in SETS.items():
        for r in load_rows([TIMING / f for f in files]):
            measured = r.get("measured_peak_allocated_bytes")
            if r["plan"].get("quantization") != args.quantization or not measured:
                continue
            spec, plan, gpu, _ = traced(r)
            estimated = estimate(spec, plan, gpu).peak_allocated_bytes
            rows.append({"set": name, "index": r["index"], "model": r["model"], "plan": r["plan"],
                         "measured_peak_allocated_bytes": measured, "estimated_peak_allocated_bytes": estimated,
                         "error": estimated / measured - 1})
            print(name, r["index"], r["model"], plan.checkpointing, f"{plan.batch_size}x{plan.seq_len}",
                  f"{rows[-1]['error']:+.2%}", flush=True)

    def summary(errs):
        errs = [abs(e) for e in errs]
        return {"n": len(errs), "median_abs_err": statistics.median(errs), "max_abs_err": max(errs)} if errs else None

    args.out.write_text(json.dumps({
        "commit": commit(), "quantization": args.quantization,
        "command": f"python bench/kbit_memory.py OUT.json --quantization {args.quantization}",
        "grid": summary([r["error"] for r in rows if r["set"] == "grid"]),
        "out_of_sample_sets": summary([r["error"] for r in rows if r["set"] != "grid"]),
        "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
