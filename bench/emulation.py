"""Compare the estimator's verdicts with the emulated-GPU validations on the H200.

    python bench/emulation.py   # reads bench/results/validation.jsonl, writes bench/results/emulation.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memtune.estimate import estimate  # noqa: E402
from memtune.plan import Plan  # noqa: E402
from memtune.specs import resolve_gpu, resolve_model  # noqa: E402


def main() -> None:
    rows = [json.loads(line) for line in (ROOT / "bench/results/validation.jsonl").read_text().splitlines()]
    lines = ["| validation | GPU time (s) | measured | estimate (2 % margin) | agrees |", "|---|---:|---|---|---|"]
    agree = total = borderline = 0
    for r in rows:
        spec, plan = resolve_model(r["model"]), Plan.from_dict(r["plan"])
        est = estimate(spec, plan, resolve_gpu(r["gpu"]))
        if r["mode"] == "emulated":
            measured = "out of memory" if r["oom"] else "fits"
            clear = est.verdict != "borderline"
            ok = (not r["oom"]) == est.fits if clear else True
            total, agree, borderline = total + clear, agree + (ok and clear), borderline + (not clear)
            lines.append(f"| {r['case']} | {r['wall_s']} | {measured} | {est.verdict} | {'yes' if ok else '**no**'} |")
        else:
            err = est.peak_allocated_bytes / r["measured_peak_allocated_bytes"] - 1
            ok = abs(err) <= r["tolerance"]
            lines.append(f"| {r['case']} on {r['device_name']} | {r['wall_s']} | "
                         f"{r['measured_peak_allocated_bytes'] / 2**30:.2f} GiB peak allocated | "
                         f"{est.peak_allocated_bytes / 2**30:.2f} GiB ({100 * err:+.2f} %) | {'yes' if ok else '**no**'} |")
    text = ("Validations of Llama-Guard-3-1B plans on an H200 (`python bench/validation.py`), against the estimate of "
            "the current code (`python bench/emulation.py`). "
            f"Emulated runs: the estimator gave a clear verdict for {total} and {agree} of them agree; {borderline} "
            "were called borderline (they fit only once the allocator releases its cache under pressure, or only "
            "without the safety margin), and went either way.\n\n" + "\n".join(lines) + "\n")
    (ROOT / "bench/results/emulation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
