"""The seed case with the real llama-cookbook: Llama-Guard-3-1B full fine-tunes through ``finetuning.main`` on an H200
capped to an L4-24GB and to a V100-32GB (with the attention kernel each card would run), without and with
``enable_fsdp``, against ``memtune estimate --stack llama-cookbook``: the issue's settings (padding, batch 1), the
same at llama-cookbook's default batch of 4, its default packing (4 x 4,096), and a LoRA.

    python bench/cookbook.py OUT.json        # on the GPU machine, llama-cookbook 0.0.5 and fire installed
    python bench/cookbook.py --estimate MEASURED.json OUT.json   # memtune's side again, at this commit (CPU)

Each run is a fresh process calling ``llama_cookbook.finetuning.main(**kwargs)`` (FSDP runs as rank 0 of a world of
one) on a random-init model saved to a folder with a word-level tokenizer of the model's vocabulary, and the longest
ToxicChat sample of the case (1,139 tokens, ``bench/assets/cookbook_dataset.py``) for ``max_train_step`` steps. Two
changes let llama-cookbook 0.0.5 run on accelerate 1.x and transformers 5, neither touching what it allocates:
``accelerate.utils.is_ccl_available`` (removed from accelerate, an Intel-only check) returns False, and its
``from_pretrained(use_cache=None)`` (which transformers 5's config refuses) leaves ``use_cache`` to the config's
default, which is what None meant. memtune's estimate runs as the command line (``memtune estimate --json``) while
the run goes on.

OUT.json: ``runs`` (``gpu``, ``kwargs``, ``oom``, ``measured_peak_allocated_bytes``, ``error``), each with memtune's
command (``memtune_command``), its plan, ``estimated_peak_allocated_bytes`` and ``memtune_verdict``; ``verdicts_agree``
counts the runs whose OOM-or-not is what memtune said.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from provenance import commit  # noqa: E402

MODEL = "llama-guard-3-1b"
SEQ = 1139
BASE = {"batch_size_training": 1, "batching_strategy": "padding", "context_length": 4096, "use_peft": False,
        "quantization": None, "dataset": "custom_dataset", "run_validation": False, "num_epochs": 1,
        "max_train_step": 3, "save_model": False, "num_workers_dataloader": 0,
        "custom_dataset.file": str(ROOT / "bench/assets/cookbook_dataset.py")}
FSDP = {"enable_fsdp": True}
BATCH4 = {"batch_size_training": 4}
PACKED = {"batch_size_training": 4, "batching_strategy": "packing"}
RUNS = [("L4-24GB", {}), ("L4-24GB", FSDP), ("V100-32GB", {}), ("V100-32GB", FSDP),
        ("L4-24GB", BATCH4), ("L4-24GB", {**BATCH4, **FSDP}), ("V100-32GB", BATCH4), ("V100-32GB", {**BATCH4, **FSDP}),
        ("L4-24GB", {**PACKED, **FSDP}), ("L4-24GB", {**BATCH4, "use_peft": True})]


def memtune_options(kwargs: dict) -> list[str]:
    """The ``memtune estimate`` options for what ``finetuning.main(**kwargs)`` runs: padding pads each batch to its
    longest sample (all are 1,139 tokens here), packing fills ``context_length``; ``enable_fsdp`` brings
    checkpointing (``fsdp_activation_checkpointing`` is on by default), which brings FSDP over one GPU."""
    kw = {**BASE, **kwargs}
    seq = SEQ if kw["batching_strategy"] == "padding" else kw["context_length"]
    return ["--model", MODEL, "--stack", "llama-cookbook", "--batch-size", str(kw["batch_size_training"]),
            "--seq-len", str(seq), "--checkpointing", "full" if kw.get("enable_fsdp") else "none",
            "--peft", "lora" if kw["use_peft"] else "none"]


def model_dir() -> Path:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from memtune.specs import resolve_model

    path = Path("/tmp/memtune-cookbook") / MODEL
    if not (path / "config.json").exists():
        spec = resolve_model(MODEL)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(spec.hf_config(), dtype=torch.bfloat16).save_pretrained(path)
        vocab = {f"t{i}": i for i in range(spec.vocab_size)}
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                      bos_token="t1", eos_token="t2", pad_token="t2", unk_token="t0")
        tok.save_pretrained(path)
    return path


def run_one(gpu_name: str, extra: dict, path: str) -> dict:
    import torch

    from memtune.estimate import overhead
    from memtune.plan import Plan
    from memtune.estimate.compose import sdpa_backend
    from memtune.specs import resolve_gpu, resolve_model
    from memtune.validate.probe import _sdpa_kernel

    import accelerate.utils

    accelerate.utils.is_ccl_available = lambda: False
    from llama_cookbook import finetuning

    load = finetuning.LlamaForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        if kwargs.get("use_cache", False) is None:  # transformers 5's config takes a bool; None meant its default
            del kwargs["use_cache"]
        return load(cls, *args, **kwargs)

    finetuning.LlamaForCausalLM.from_pretrained = classmethod(from_pretrained)

    gpu = resolve_gpu(gpu_name)
    fsdp = bool(extra.get("enable_fsdp"))
    plan = Plan(sharding="fsdp" if fsdp else "none", checkpointing="full" if fsdp else "none", seq_len=SEQ,
                stack="llama-cookbook")  # what sets the card's cap and attention kernels
    cap = gpu.memory_bytes - overhead.runtime_overhead_bytes(plan.has_process_group)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory), 0)
    if extra.get("enable_fsdp"):
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    result = {"gpu": gpu_name, "kwargs": {**BASE, **extra, "model_name": path}}
    try:
        with _sdpa_kernel(sdpa_backend(resolve_model(MODEL), plan, gpu)):
            finetuning.main(**result["kwargs"])
        result["oom"] = False
    except torch.OutOfMemoryError:
        result["oom"] = True
    result["measured_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def _estimate(row: dict, gpu_name: str, extra: dict) -> None:
    """memtune's side of a run, through its command line: the plan, the estimate, the verdict and the agreement."""
    command = ["memtune", "estimate", *memtune_options(extra), "--gpu", gpu_name, "--json"]
    est = subprocess.run([sys.executable, "-m", "memtune", *command[1:]], capture_output=True, text=True, cwd=ROOT)
    row["memtune_command"] = " ".join(command)
    for key in ("memtune_plan", "estimated_peak_allocated_bytes", "memtune_verdict", "error_allocated",
                "verdict_agrees", "memtune_error"):
        row.pop(key, None)
    if est.returncode == 0:
        b = json.loads(est.stdout)
        row.update(memtune_plan=b["plan"], estimated_peak_allocated_bytes=b["peak_allocated_bytes"],
                   memtune_verdict=b["verdict"])
    else:
        row["memtune_error"] = est.stderr.strip()[-500:]
    if row.get("measured_peak_allocated_bytes") and row.get("oom") is False and "estimated_peak_allocated_bytes" in row:
        row["error_allocated"] = row["estimated_peak_allocated_bytes"] / row["measured_peak_allocated_bytes"] - 1
    if "oom" in row and "memtune_verdict" in row:
        row["verdict_agrees"] = row["oom"] == (row["memtune_verdict"] == "does not fit")


def reestimate(measured: Path, out: Path) -> None:
    """The runs of ``measured`` (the real tool's side, which memtune's code does not change) with memtune's
    estimates of this commit."""
    result = json.loads(measured.read_text())
    result["estimated_at"] = commit(short=True)
    result["measured_by"] = result.pop("command", "python bench/cookbook.py OUT.json")
    result["command"] = f"python bench/cookbook.py --estimate {measured.name} OUT.json"
    for row in result["runs"]:
        extra = {k: v for k, v in row["kwargs"].items() if k not in BASE or BASE[k] != v}
        extra.pop("model_name", None)
        _estimate(row, row["gpu"], extra)
        print(json.dumps({k: v for k, v in row.items() if k not in ("kwargs", "memtune_plan")}), flush=True)
    agree = sum(bool(r.get("verdict_agrees")) for r in result["runs"])
    result["verdicts_agree"] = f"{agree} of {len(result['runs'])}"
    out.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    if sys.argv[1] == "--run":
        print("RESULT " + json.dumps(run_one(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])), flush=True)
        return
    if sys.argv[1] == "--estimate":
        reestimate(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    import torch
    import transformers

    out = Path(sys.argv[1])
    path = str(model_dir())
    result = {"command": "python bench/cookbook.py OUT.json", "model": MODEL, "seq_len": SEQ,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "llama_cookbook": "0.0.5", "gpu_name": torch.cuda.get_device_name()}, "runs": []}
    for gpu_name, extra in RUNS:
        started = time.time()
        real = subprocess.Popen([sys.executable, __file__, "--run", gpu_name, json.dumps(extra), path],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = real.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(lines[-1][7:]) if lines else {
            "gpu": gpu_name, "kwargs": extra, "error": " | ".join((stderr or stdout).strip().splitlines()[-4:])[-800:]}
        _estimate(row, gpu_name, extra)
        row["wall_s"] = round(time.time() - started, 1)
        result["runs"].append(row)
        result["verdicts_agree"] = f"{sum(bool(r.get('verdict_agrees')) for r in result['runs'])} of {len(result['runs'])}"
        print(json.dumps({k: v for k, v in row.items() if k not in ("kwargs", "memtune_plan")}), flush=True)
        out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
