"""Join the GPU measurements with memtune's estimates and summarize the accuracy.

    python bench/accuracy.py bench/results/raw/*.jsonl

writes ``bench/results/accuracy.jsonl`` (one row per configuration: the plan fields named as the CLI options,
measured and estimated peak allocated/reserved bytes, versions) and ``bench/results/accuracy.md`` (summary and
table, also shown in docs/estimator.md). The raw rows come from ``bench/measure.py`` on the GPU; the estimates are
computed here, on the CPU, by the shipped estimator. Two simple formula baselines are computed on the same rows
for comparison: 18 bytes per parameter (full fine-tune with AdamW, as the Hugging Face docs state) and
4 x the model's size in its dtype (``accelerate estimate-memory`` style).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memtune.estimate import estimate  # noqa: E402
from provenance import commit  # noqa: E402
from memtune.plan import Plan  # noqa: E402
from memtune.specs import resolve_gpu, resolve_model  # noqa: E402

OUT = ROOT / "bench" / "results"
PLAN_FIELDS_AS_OPTIONS = {f: f.replace("_", "-") for f in Plan().to_dict()}


def baselines(spec, plan: Plan) -> dict[str, int]:
    bytes_per = 4 if plan.precision == "fp32" else 2
    return {"hf_18_bytes_per_param": 18 * spec.num_params, "four_x_model_size": 4 * bytes_per * spec.num_params}


def main(paths: list[str]) -> None:
    stamp = commit(short=True)  # before this script rewrites its own outputs
    gpu_cache = {}
    rows = []
    for line in (ln for p in paths for ln in Path(p).read_text().splitlines() if ln.strip()):
        raw = json.loads(line)
        if "error" in raw:
            print(f"skipped (measurement failed): {raw.get('model')} {raw.get('message', '')[:120]}")
            continue
        spec = resolve_model(raw["model"])
        plan = Plan.from_dict(raw["plan"])
        gpu = gpu_cache.setdefault(raw["gpu_name"], resolve_gpu(raw["gpu_name"]))
        t0 = time.perf_counter()
        est = estimate(spec, plan, gpu)
        seconds = time.perf_counter() - t0
        row = {"model": raw["model"], "gpu_name": raw["gpu_name"], "num_gpus": plan.world_size}
        row.update({PLAN_FIELDS_AS_OPTIONS[k]: v for k, v in plan.to_dict().items()})
        row.update(
            measured_peak_allocated_bytes=raw["measured_peak_allocated_bytes"],
            measured_peak_reserved_bytes=raw["measured_peak_reserved_bytes"],
            estimated_peak_allocated_bytes=est.peak_allocated_bytes,
            estimated_peak_reserved_bytes=est.peak_reserved_bytes,
            measured_phases=raw["measured_phases"],
            estimated_phases={p.value: est.phase_peak(p) for p in est.phases},
            allocated_error=est.peak_allocated_bytes / raw["measured_peak_allocated_bytes"] - 1,
            reserved_error=est.peak_reserved_bytes / raw["measured_peak_reserved_bytes"] - 1,
            baseline_errors={k: v / raw["measured_peak_allocated_bytes"] - 1 for k, v in baselines(spec, plan).items()},
            estimate_seconds=round(seconds, 3),
            torch_version=raw["torch"], transformers_version=raw["transformers"], peft_version=raw["peft"],
        )
        rows.append(row)
    (OUT / "accuracy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (OUT / "accuracy.md").write_text(summary(rows, stamp))
    print(summary(rows, stamp))


def _stats(errors: list[float]) -> str:
    abs_err = [abs(e) for e in errors]
    return (f"median |error| {100 * statistics.median(abs_err):.2f} %, max |error| {100 * max(abs_err):.2f} %, "
            f"worst under-estimate {100 * min(0.0, min(errors)):.2f} %")


def summary(rows: list[dict], stamp: str) -> str:
    archs = sorted({resolve_model(r["model"]).model_type for r in rows})
    lines = [
        f"{len(rows)} configurations, {len(archs)} architectures ({', '.join(archs)}), "
        f"{sum(r['num_gpus'] > 1 for r in rows)} of them FSDP2 on 2 GPUs; measured on {rows[0]['gpu_name']} "
        f"(torch {rows[0]['torch_version']}, transformers {rows[0]['transformers_version']}, peft {rows[0]['peft_version']}).",
        f"Estimates of memtune at {stamp}; when each row was measured: bench/results/README.md.",
        "",
        f"- **memtune, peak allocated**: {_stats([r['allocated_error'] for r in rows])}",
        f"- **memtune, peak reserved**: {_stats([r['reserved_error'] for r in rows])}",
    ]
    for name in rows[0]["baseline_errors"]:
        lines.append(f"- baseline `{name}` (peak allocated): {_stats([r['baseline_errors'][name] for r in rows])}")
    lines += ["", "| model | plan | measured alloc GiB | estimated | error | measured reserved GiB | estimated | error |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    default = Plan().to_dict()
    for r in rows:
        lines.append(
            f"| {r['model']} | {_fmt_plan(r, default)} | {r['measured_peak_allocated_bytes'] / 2**30:.2f} | "
            f"{r['estimated_peak_allocated_bytes'] / 2**30:.2f} | {100 * r['allocated_error']:+.2f} % | "
            f"{r['measured_peak_reserved_bytes'] / 2**30:.2f} | {r['estimated_peak_reserved_bytes'] / 2**30:.2f} | "
            f"{100 * r['reserved_error']:+.2f} % |")
    return "\n".join(lines) + "\n"


def _fmt_plan(row: dict, default: dict) -> str:
    parts = []
    for field, value in default.items():
        option = PLAN_FIELDS_AS_OPTIONS[field]
        got = row[option]
        if field in ("batch_size", "seq_len") or got != (list(value) if isinstance(value, tuple) else value):
            parts.append(f"{option}={','.join(got) if isinstance(got, list) else got}")
    return " ".join(parts)


if __name__ == "__main__":
    main(sys.argv[1:])
