"""Run ``memtune launch`` on the ToxicChat prompts in the Llama Guard format - a full fine-tune in bf16 and LoRA -
and record throughput, MFU and peak memory against memtune's estimate.

    python bench/launch_h200.py --out bench/results/launch-h200 \\
        --data PATH/TO/toxicchat/train.jsonl [--tokenizer LLAMA_GUARD_TOKENIZER_FOLDER]

Defaults: Llama-Guard-3-1B (``profiles/models/llama-guard-3-1b``, random init: no weights are needed), the H200
profile, 300 steps, micro-batch 8, sequences padded to at most 1024 tokens (length-grouped batches). Without
``--tokenizer`` the samples are tokenized with the tiny run's 512-token tokenizer (``profiles/runs/tiny-llama-guard``):
its ids fit any vocabulary, but its sequences are longer than Llama 3's; the JSON names the tokenizer used.

Writes ``OUT/launch.json``: per mode, tokens/s (median over the steps after the first ``--skip`` ones), MFU
(tokens/s x FLOPs per token / the GPU profile's peak FLOP/s for the compute dtype) in two conventions: ``mfu`` with
memtune's count (``memtune.planner.cost.flops_per_token``: causal attention, half the score matrix) and
``mfu_palm`` with the usual one (PaLM, torchtitan: ``6 N + 12 L H Q T``, all of the score matrix), measured peak allocated/reserved bytes (the largest of all
logged steps) and the estimate's, with the device the run actually used. Each mode's run folder (metrics, report)
is kept under OUT/<mode>. On a machine without CUDA the runs go on the CPU and memory is not measured (null):

    python bench/launch_h200.py --out /tmp/launch-cpu --model profiles/runs/tiny-llama-guard --steps 3
    python bench/launch_h200.py --rescore OUT/launch.json   # add mfu_palm to an earlier record
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = {
    "full-bf16": {"precision": "bf16"},
    "lora-bf16": {"precision": "bf16", "peft": "lora"},
}
LR = {"full-bf16": 1e-5, "lora-bf16": 1e-4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for launch.json and the run folders")
    parser.add_argument("--model", default="llama-guard-3-1b", help="profile name or model folder (random init)")
    parser.add_argument("--gpu", default="H200-141GB", help="GPU profile (peak FLOP/s, the estimate)")
    parser.add_argument("--data", default=str(ROOT / "profiles/runs/data/toxicchat-mini.jsonl"),
                        help="ToxicChat-style JSONL (user_input, toxicity)")
    parser.add_argument("--tokenizer", default=str(ROOT / "profiles/runs/tiny-llama-guard"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the throughput median")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batching", choices=("padding", "packing"), default="padding",
                        help="padding: length-grouped batches of whole samples; packing: full sequences of --seq-len")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {', '.join(MODES)}")
    return parser.parse_args(argv)


def palm_flops_per_token(spec, plan) -> float:
    """``6 N + 12 L H Q T`` (Chowdhery et al. 2022, appendix B; torchtitan's ``get_num_flop_per_token``): N the
    weights of every matmul, attention over the whole sequence; LoRA's frozen weights need no weight gradients."""
    from memtune.planner.cost import linear_params

    per_pass = 2 * linear_params(spec) + 4 * spec.num_layers * spec.num_attention_heads * spec.head_dim * plan.seq_len
    return per_pass * (2 if plan.peft == "lora" else 3)


def rescore(path: Path) -> None:
    """Add ``mfu_palm`` to the rows of an earlier ``launch.json`` (same measured tokens/s)."""
    from memtune.plan import Plan
    from memtune.specs import resolve_model

    data = json.loads(path.read_text())
    for row in data["rows"]:
        spec, plan = resolve_model(data["model"]), Plan.from_dict(row["plan"])
        row["flops_per_token_palm"] = palm_flops_per_token(spec, plan)
        row["mfu_palm"] = row["tokens_per_s"] * row["flops_per_token_palm"] / row["peak_flops"]
    path.write_text(json.dumps(data, indent=2) + "\n")


def run_mode(mode: str, args: argparse.Namespace, out: Path) -> dict:
    from rich.console import Console

    from memtune.runconfig import RunConfig
    from memtune.launch.runner import launch
    from memtune.plan import Plan
    from memtune.planfile import PlanFile
    from memtune.planner.cost import flops_per_token, peak_flops
    from memtune.specs import resolve_gpu, resolve_model

    spec, gpu = resolve_model(args.model), resolve_gpu(args.gpu)
    seq_len = min(args.seq_len, spec.max_position_embeddings or args.seq_len)
    plan = Plan(batch_size=args.batch_size, seq_len=seq_len, batching=args.batching, **MODES[mode])
    run = RunConfig(dataset=str(Path(args.data).resolve()), format="llama-guard", prompt_field="user_input",
                    label_field="toxicity", tokenizer=str(Path(args.tokenizer).resolve()), max_steps=args.steps,
                    lr=LR[mode], warmup_steps=min(10, args.steps), log_every=1, random_init=True)
    folder = out / mode
    result = launch(PlanFile(model=args.model, gpu=gpu.name, plan=plan, run=run), base_dir=ROOT, output_dir=folder,
                    command=[sys.executable, *sys.argv], console=Console(highlight=False))
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    steady = [r for r in steps if r["step"] > args.skip] or steps
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady if r.get("tokens_per_s"))
    flops = flops_per_token(spec, plan)
    allocated = [r["peak_allocated_bytes"] for r in steps if r.get("peak_allocated_bytes") is not None]
    reserved = [r["peak_reserved_bytes"] for r in steps if r.get("peak_reserved_bytes") is not None]
    estimate = result.record.get("estimate") or {}
    measured = max(allocated) if allocated else None
    return {
        "mode": mode, "status": result.status, "device": result.record["device"], "plan": plan.to_dict(),
        "steps": len(steps), "tokens_per_s": tokens_per_s, "flops_per_token": flops,
        "peak_flops": peak_flops(gpu, plan), "mfu": tokens_per_s * flops / peak_flops(gpu, plan),
        "flops_per_token_palm": palm_flops_per_token(spec, plan),
        "mfu_palm": tokens_per_s * palm_flops_per_token(spec, plan) / peak_flops(gpu, plan),
        "step_time_s": statistics.median(r["step_time_s"] for r in steady),
        "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
        "measured_peak_allocated_bytes": measured,
        "measured_peak_reserved_bytes": max(reserved) if reserved else None,
        "estimated_peak_allocated_bytes": estimate.get("peak_allocated_bytes"),
        "estimated_peak_reserved_bytes": estimate.get("peak_reserved_bytes"),
        "estimate_error": (estimate["peak_allocated_bytes"] / measured - 1) if measured and estimate else None,
        "run_folder": str(folder),
    }


def main(argv: list[str] | None = None) -> Path:
    import torch
    import transformers

    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    rows = []
    for mode in modes:
        rows.append(run_mode(mode, args, out))
        print(json.dumps({k: rows[-1][k] for k in ("mode", "status", "tokens_per_s", "mfu",
                                                   "measured_peak_allocated_bytes",
                                                   "estimated_peak_allocated_bytes")}), flush=True)
    path = out / "launch.json"
    path.write_text(json.dumps({
        "command": " ".join([sys.executable, *sys.argv]), "model": args.model, "gpu_profile": args.gpu,
        "data": args.data, "tokenizer": args.tokenizer, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "batching": args.batching,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "rows": rows}, indent=2) + "\n")
    return path


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rescore"]:
        for name in sys.argv[2:]:
            rescore(Path(name))
    else:
        print(main())
