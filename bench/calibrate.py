"""Write measured/estimated ratios per GPU and architecture family to ``profiles/calibration/``.

    python bench/calibrate.py   # reads bench/results/accuracy.jsonl
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memtune.plan import Plan  # noqa: E402
from memtune.planner.cost import (  # noqa: E402
    flops_per_token, optimizer_s, peak_flops, plan_class, selective_recompute_s)
from memtune.specs import resolve_gpu, resolve_model  # noqa: E402


def utilization(raw_paths: list[Path], gpu: str) -> dict:
    """Fit the utilization model of ``memtune.planner.cost`` to the measured single-GPU steps.

    Model FLOPs utilization grows with the matmul size: ``u = u_max * x / (x + x_half)`` with x = tokens per
    micro-batch x hidden size, fitted (least squares in log space, grid search) on 16-bit steps without
    quantization, over the step's time less what the cost model books outside the FLOPs (the optimizer step,
    selective checkpointing's recompute; offloaded steps are left out); other classes (fp32, 4-bit, 8-bit weights) get the median ratio of their measurements to it.
    """
    points: list[tuple[str, float, float]] = []
    for path in raw_paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if "error" in r or r.get("num_gpus", 1) != 1 or resolve_gpu(r["gpu_name"]).name != gpu:
                continue
            plan, spec, card = Plan.from_dict(r["plan"]), resolve_model(r["model"]), resolve_gpu(gpu)
            if plan.offload:  # its step is bound by PCIe and the CPU (cost.offload_s), not by the GPU's FLOPs
                continue
            tokens = r["tokens_per_s"] * r["step_time_s"]
            flop_time = r["step_time_s"] - optimizer_s(spec, plan, card) - selective_recompute_s(spec, plan, card,
                                                                                                  round(tokens))
            achieved = flops_per_token(spec, plan) * tokens / flop_time / peak_flops(card, plan)
            points.append((plan_class(plan), plan.batch_size * plan.seq_len * spec.hidden_size, achieved))
    base = [(x, u) for c, x, u in points if c == "16bit/none"]
    _, u_max, x_half = min(
        (sum((math.log(um * x / (x + xh)) - math.log(u)) ** 2 for x, u in base), um, xh)
        for um in (i / 100 for i in range(20, 100, 2)) for xh in (10 ** (i / 20) for i in range(100, 200)))
    factors = defaultdict(list)
    for c, x, u in points:
        factors[c].append(u / (u_max * x / (x + x_half)))
    return {"u_max": u_max, "x_half": x_half, "configurations": len(points),
            "class_factor": {c: statistics.median(v) for c, v in sorted(factors.items())}}


def main() -> None:
    rows = [json.loads(line) for line in (ROOT / "bench/results/accuracy.jsonl").read_text().splitlines()]
    by_gpu: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_gpu[resolve_gpu(r["gpu_name"]).name][resolve_model(r["model"]).model_type].append(r)
    for gpu, families in by_gpu.items():
        out = {"gpu": gpu, "measured_with": "python bench/measure.py (bench/results/raw), joined by "
                                          "python bench/accuracy.py; ratio = measured / estimated",
               "torch": rows[0]["torch_version"], "transformers": rows[0]["transformers_version"], "families": {}}
        for family, rs in sorted(families.items()):
            out["families"][family] = {"configurations": len(rs)} | {
                kind: {"median": statistics.median(ratios), "max": max(ratios)}
                for kind in ("allocated", "reserved")
                for ratios in [[r[f"measured_peak_{kind}_bytes"] / r[f"estimated_peak_{kind}_bytes"] for r in rs]]}
        out["utilization"] = utilization(sorted((ROOT / "bench/results/raw").glob("*.jsonl")), gpu)
        path = ROOT / "profiles" / "calibration" / f"{gpu}.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(path)


if __name__ == "__main__":
    main()
