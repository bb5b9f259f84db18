"""What the tools people already run really use, against memtune's estimate of them (``--stack hf``), on one GPU.

    python bench/clients.py OUT.json            # on the GPU machine (bitsandbytes and datasets installed)

For each case: memtune's Hugging Face export of the plan (``memtune.planner.export.hf_trainer_config``) is run as a
user would run it - a random-init model saved to a folder and loaded with ``from_pretrained(**export["model"])``
(``BitsAndBytesConfig`` for k-bit plans), ``get_peft_model(LoraConfig(**export["lora_config"]))``,
``Trainer(args=TrainingArguments(**export["training_arguments"]))`` on a local dataset of full-length sequences -
for a few steps, in a fresh process, under the target card's memory cap with that card's attention kernel. Its peak
allocated memory over the steps is compared with ``memtune.estimate(plan with stack="hf")`` on the same card.

Then memtune's own QLoRA with and without ``kbit_upcast`` trains for ``QLORA_STEPS`` steps on the same learnable
sequences (losses recorded), each with its measured peak against its estimate.

OUT.json: ``cases`` (``name``, ``gpu``, ``plan``, ``export``, ``measured_peak_allocated_bytes``,
``estimated_peak_allocated_bytes``, ``error``), ``qlora`` (per ``kbit_upcast``: losses, peaks), ``versions``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memtune.plan import Plan  # noqa: E402

MODEL = "llama-guard-3-1b"
QV = ("q_proj", "v_proj")
CASES = [
    # (name, GPU whose memory caps the run, plan)
    ("full FT, full checkpointing, 8-bit AdamW, 4 x 1152 (the issue's L4 case)", "L4-24GB",
     Plan(checkpointing="full", optimizer="adamw-8bit", batch_size=4, seq_len=1152, grad_accum=2, stack="hf")),
    ("full FT, no checkpointing, AdamW, 2 x 1152", "H200-141GB",
     Plan(optimizer="adamw", batch_size=2, seq_len=1152, stack="hf")),
    ("full FT amp-bf16, full checkpointing, fused AdamW, 2 x 2048", "H200-141GB",
     Plan(precision="amp-bf16", checkpointing="full", optimizer="adamw-fused", batch_size=2, seq_len=2048,
          stack="hf")),
    ("LoRA q,v, 4 x 2048", "H200-141GB",
     Plan(peft="lora", lora_targets=QV, batch_size=4, seq_len=2048, stack="hf")),
    ("QLoRA NF4 q,v, 4 x 2048", "H200-141GB",
     Plan(peft="lora", quantization="4bit", lora_targets=QV, batch_size=4, seq_len=2048, stack="hf")),
    ("QLoRA NF4 q,v, full checkpointing, 4 x 2048, L4 cap", "L4-24GB",
     Plan(peft="lora", quantization="4bit", lora_targets=QV, checkpointing="full", batch_size=4, seq_len=2048,
          stack="hf")),
    ("LoRA q,v on V100: fp32 weights, fp16 autocast, 2 x 1024", "V100-32GB",
     Plan(precision="amp-fp16", peft="lora", lora_targets=QV, batch_size=2, seq_len=1024, stack="hf")),
]
QLORA_STEPS = 300
QLORA_PLAN = Plan(peft="lora", quantization="4bit", lora_targets=QV, batch_size=4, seq_len=512)


def _cap(gpu_name: str):
    from memtune.estimate import overhead
    from memtune.specs import resolve_gpu

    gpu = resolve_gpu(gpu_name)
    return gpu, gpu.memory_bytes - overhead.runtime_overhead_bytes(False)


def _estimate(plan: Plan, gpu_name: str) -> int:
    from memtune.estimate.compose import estimate
    from memtune.specs import resolve_gpu, resolve_model

    return estimate(resolve_model(MODEL), plan, resolve_gpu(gpu_name)).peak_allocated_bytes


def _model_dir() -> Path:
    """A random-init copy of the model in bf16 (what ``from_pretrained`` loads)."""
    import torch
    from transformers import AutoModelForCausalLM

    from memtune.specs import resolve_model

    path = Path("/tmp/memtune-clients") / MODEL
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(resolve_model(MODEL).hf_config(), dtype=torch.bfloat16)
        model.save_pretrained(path)
    return path


def run_trainer(case_json: str) -> dict:
    """One case in this process: the export as a user runs it, a few Trainer steps, the peak."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    from memtune.estimate.compose import sdpa_backend
    from memtune.planner.export import hf_trainer_config
    from memtune.specs import resolve_model
    from memtune.validate.probe import _sdpa_kernel

    case = json.loads(case_json)
    plan = Plan.from_dict(case["plan"])
    gpu, cap = _cap(case["gpu"])
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
    export = hf_trainer_config(str(case["model_dir"]), plan)
    model_kwargs = dict(export["model"])
    if "quantization_config" in model_kwargs:
        q = dict(model_kwargs["quantization_config"])
        if "bnb_4bit_compute_dtype" in q:
            q["bnb_4bit_compute_dtype"] = getattr(torch, q["bnb_4bit_compute_dtype"])
        model_kwargs["quantization_config"] = BitsAndBytesConfig(**q)
    model = AutoModelForCausalLM.from_pretrained(**model_kwargs, device_map={"": 0})
    if "lora_config" in export:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**export["lora_config"]))
    ids = torch.randint(0, model.config.vocab_size, (64, plan.seq_len), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir="/tmp/memtune-clients/out", max_steps=4, logging_steps=1, save_strategy="no",
                             report_to=[], **export["training_arguments"])
    trainer = Trainer(model=model, args=args, train_dataset=data)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    spec = resolve_model(MODEL)
    with _sdpa_kernel(sdpa_backend(spec, plan, gpu)):
        trainer.train()
    return {"measured_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "export": export}


def train_qlora(upcast: bool) -> dict:
    """memtune's own QLoRA for ``QLORA_STEPS`` steps on sequences a model can learn (a repeated random motif)."""
    import dataclasses

    import torch

    from memtune.specs import resolve_model
    from memtune.train import recipe

    plan = dataclasses.replace(QLORA_PLAN, kbit_upcast=upcast)
    spec = resolve_model(MODEL)
    torch.manual_seed(0)
    model = recipe.build_model(spec, plan, device="cuda")
    optimizer = recipe.build_optimizer(model, plan, lr=2e-4)
    g = torch.Generator().manual_seed(1)
    motifs = torch.randint(0, 1000, (16, 32), generator=g)
    torch.cuda.reset_peak_memory_stats()
    losses = []
    for step in range(QLORA_STEPS):
        rows = motifs[torch.randint(0, 16, (plan.batch_size,), generator=g)]
        ids = rows.repeat(1, plan.seq_len // 32).cuda()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"kbit_upcast": upcast, "plan": plan.to_dict(), "losses": losses,
            "measured_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "estimated_peak_allocated_bytes": _estimate(plan, "H200-141GB")}


def main() -> None:
    if sys.argv[1] == "--case":
        print("RESULT " + json.dumps(run_trainer(sys.argv[2])), flush=True)
        return
    if sys.argv[1] == "--qlora":
        print("RESULT " + json.dumps(train_qlora(sys.argv[2] == "upcast")), flush=True)
        return
    import bitsandbytes
    import peft
    import torch
    import transformers

    out = Path(sys.argv[1])
    model_dir = _model_dir()
    result = {"command": "python bench/clients.py OUT.json", "model": MODEL,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
                           "gpu_name": torch.cuda.get_device_name()},
              "cases": [], "qlora": []}

    def child(*args) -> dict:
        started = time.time()
        proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if lines:
            return {**json.loads(lines[-1][7:]), "wall_s": round(time.time() - started, 1)}
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        oom = any("OutOfMemoryError" in line or "out of memory" in line for line in tail)
        return {"error": "oom" if oom else " | ".join(tail)[-600:], "wall_s": round(time.time() - started, 1)}

    for name, gpu, plan in CASES:
        row = {"name": name, "gpu": gpu, "emulated": gpu != "H200-141GB", "plan": plan.to_dict(),
               "estimated_peak_allocated_bytes": _estimate(plan, gpu)}
        row.update(child("--case", json.dumps({"plan": plan.to_dict(), "gpu": gpu, "model_dir": str(model_dir)})))
        if row.get("measured_peak_allocated_bytes"):
            row["error_allocated"] = row["estimated_peak_allocated_bytes"] / row["measured_peak_allocated_bytes"] - 1
        result["cases"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("export", "plan")}), flush=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    for upcast in (False, True):
        row = child("--qlora", "upcast" if upcast else "plain")
        if row.get("measured_peak_allocated_bytes"):
            row["error_allocated"] = row["estimated_peak_allocated_bytes"] / row["measured_peak_allocated_bytes"] - 1
        result["qlora"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
