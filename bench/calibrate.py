"""Write measured/estimated ratios per GPU and architecture family to ``profiles/calibration/``.

    python bench/calibrate.py   # reads bench/results/accuracy.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memtune.plan import Plan  # noqa: E402
from memtune.planner.cost import flops_per_token, peak_flops, plan_class  # noqa: E402
from memtune.specs import resolve_gpu, resolve_model  # noqa: E402


def utilization(raw_paths: list[Path], gpu: str) -> dict[str, float]:
    """Median model-FLOPs utilization of the measured steps, per plan class (one GPU only: no communication)."""
    by_class: dict[str, list[float]] = defaultdict(list)
    for path in raw_paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if "error" in r or r.get("num_gpus", 1) != 1 or resolve_gpu(r["gpu_name"]).name != gpu:
                continue
            plan, spec = Plan.from_dict(r["plan"]), resolve_model(r["model"])
            achieved = flops_per_token(spec, plan) * r["tokens_per_s"]
            by_class[plan_class(plan)].append(achieved / peak_flops(resolve_gpu(gpu), plan))
    return {k: statistics.median(v) for k, v in sorted(by_class.items())}


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
        out["utilization_note"] = ("median achieved/peak dense FLOP/s of the measured single-GPU steps per "
                                   "compute dtype/quantization (memtune.planner.cost)")
        path = ROOT / "profiles" / "calibration" / f"{gpu}.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(path)


if __name__ == "__main__":
    main()
