"""Regenerate the example report of the Llama Guard case: ``python reports/make_example.py``.

The plan is made now, by memtune's planner, for the README's main job: Llama-Guard-3-1B, full fine-tune, one
L4-24GB, ToxicChat in the Llama Guard prompt (214 template tokens, padding, batch 1), with llama-cookbook's AdamW
(left free, the planner picks 8-bit AdamW, about 2 % faster on the L4, which has no recorded validation). The
validation is the measured one from ``bench/results/validation.jsonl`` whose plan is the chosen one (run under the L4-24GB cap on an H200).
Writes ``reports/llama-guard-case.html`` and ``reports/index.html``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL, GPU = "llama-guard-3-1b", "L4-24GB"
LENGTHS = "tests/assets/toxicchat/lengths.csv"
COMMAND = (f"memtune plan --model {MODEL} --gpu {GPU} --peft none --optimizer adamw --dataset {LENGTHS} "
           f"--length-field user_tokens --prompt-tokens 214 --batching padding")


def plan_result() -> dict:
    """What ``COMMAND --json`` prints."""
    from memtune.data import load_lengths
    from memtune.planner import plan_candidates
    from memtune.specs import resolve_gpu, resolve_model

    lengths = load_lengths(ROOT / LENGTHS, length_field="user_tokens", extra_tokens=214)
    data = lengths.to_json() | {"source": LENGTHS}
    data["padding_efficiency"] = lengths.padded(1)[1]
    result = plan_candidates(resolve_model(MODEL), resolve_gpu(GPU), batching="padding", data=data,
                             fixed={"peft": "none", "optimizer": "adamw"}, lengths=lengths)
    return result.to_json()


def measured_validation(plan: dict) -> dict | None:
    """The recorded validation of ``plan`` on the GPU (emulated), without the benchmark's own keys."""
    from memtune.plan import Plan

    wanted = Plan.from_dict(plan)
    for line in (ROOT / "bench" / "results" / "validation.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["model"] == MODEL and record["gpu"] == GPU and Plan.from_dict(record["plan"]) == wanted:
            return {k: v for k, v in record.items() if k not in ("case", "args", "exit_code", "wall_s")}
    return None


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from memtune.report import write_index
    from memtune.report.data import Sources
    from memtune.report.html import render, write

    result = plan_result()
    validation = measured_validation(result["chosen"])
    origin = COMMAND + ("; measured: bench/results/validation.jsonl" if validation else "")
    out = write(render(Sources(origin=origin, plan_result=result, validation=validation)),
                ROOT / "reports" / "llama-guard-case.html")
    print(f"{out.relative_to(ROOT)}: {out.stat().st_size / 1024:.0f} KiB")
    print(write_index(ROOT / "reports").relative_to(ROOT))


if __name__ == "__main__":
    main()
