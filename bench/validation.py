"""Validate the Llama-Guard-3-1B plans on the GPU machine and check emulated verdicts against the estimator.

    python bench/validation.py OUT_DIR     # on a machine with 2 GPUs; writes OUT_DIR/validation.jsonl

Each case runs ``memtune validate ... --json`` in its own process and records the wall time (GPU time per
validation) with the record. Emulated cases cap PyTorch's pool to the smaller card's memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

MODEL = ["--model", "llama-guard-3-1b"]
# ToxicChat in the Llama Guard prompt: longest sample 1,139 tokens (padding, batch 1); llama-cookbook packs 4,096.
CASES = [
    ("full FT bf16", ["--precision", "bf16", "--seq-len", "1139"]),
    ("full FT bf16 + AC", ["--precision", "bf16", "--checkpointing", "full", "--seq-len", "4096"]),
    ("LoRA", ["--precision", "bf16", "--peft", "lora", "--seq-len", "4096"]),
    ("FSDP 2 GPUs", ["--precision", "bf16", "--num-gpus", "2", "--sharding", "fsdp", "--seq-len", "4096"]),
    ("QLoRA 4-bit", ["--precision", "bf16", "--peft", "lora", "--quantization", "4bit", "--seq-len", "4096"]),
]
EMULATED = [
    ("L4-24GB", ["--precision", "bf16", "--seq-len", "1139"]),
    ("L4-24GB", ["--precision", "bf16", "--seq-len", "4096"]),
    ("L4-24GB", ["--precision", "bf16", "--checkpointing", "full", "--seq-len", "4096"]),
    ("L4-24GB", ["--precision", "fp32", "--seq-len", "1139"]),
    ("L4-24GB", ["--precision", "bf16", "--peft", "lora", "--seq-len", "4096"]),
    ("V100-32GB", ["--precision", "fp32", "--seq-len", "1139"]),
    ("V100-32GB", ["--precision", "fp32", "--seq-len", "4096"]),
    ("V100-32GB", ["--precision", "fp32", "--checkpointing", "full", "--seq-len", "4096"]),
    ("V100-32GB", ["--precision", "amp-fp16", "--seq-len", "1139"]),
    ("V100-32GB", ["--precision", "fp16", "--peft", "lora", "--seq-len", "4096"]),
]


def run(label: str, args: list[str], out: Path) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "memtune", "validate", *MODEL, *args, "--steps", "5", "--json",
                           "--out", str(out / label.replace(" ", "_"))], capture_output=True, text=True)
    wall = time.time() - t0
    try:
        record = json.loads(proc.stdout)
    except json.JSONDecodeError:
        record = {"error": proc.stderr.strip().splitlines()[-3:] if proc.stderr else "no output"}
    record.update(case=label, args=args, exit_code=proc.returncode, wall_s=round(wall, 1))
    print(f"{label:40s} exit {proc.returncode} {wall:6.1f}s  {record.get('verdict', record.get('error'))}",
          flush=True)
    return record


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [run(label, args, out) for label, args in CASES]
    records += [run(f"emulated {gpu} {' '.join(args)}", ["--emulate-gpu", gpu, *args], out) for gpu, args in EMULATED]
    (out / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main(sys.argv[1])
