"""Op by op, what one training step's forward and backward hold on a CUDA GPU against memtune's trace of the same
step on fake tensors: where the two first part, and which CUDA ops allocate temporaries inside the kernel (their
peak during the op above what is live after it).

    python bench/op_memory.py OUT.json [--model llama-guard-3-1b] [--precision amp-fp16] [--checkpointing full]
        [--seq-len 4096] [--layers 2] [--sdpa math] [--attention sdpa|eager] [--peft lora --quantization 4bit]
        [--batch-size 1]   # on a GPU machine (bitsandbytes for k-bit weights)

Both sides run ``memtune.train.recipe`` on a model of ``--layers`` decoder layers; the CUDA side logs, after every
aten op (backward ops included), the bytes allocated and the highest point inside the op; the trace side logs the
caching-allocator model's allocated bytes after every op and inside it (with the CUDA workspaces it books).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memtune.estimate import trace  # noqa: E402
from memtune.estimate.categories import MemCategory  # noqa: E402
from memtune.plan import Plan  # noqa: E402
from memtune.specs import resolve_model  # noqa: E402
from memtune.train import recipe  # noqa: E402


class CudaOpLog(TorchDispatchMode):
    """After each op: (name, allocated bytes, highest allocated bytes while it ran)."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        torch.cuda.reset_peak_memory_stats()
        out = func(*args, **(kwargs or {}))
        self.rows.append((str(func), torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))
        return out


class TraceOpLog(trace._Tracker):
    """memtune's tracker that also logs (name, allocated bytes after the op, highest point inside it: the outputs
    plus the CUDA kernel's workspace the trace books)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.rows: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        after = self.allocator.allocated
        self.rows.append((str(func), after, after + trace.cuda_workspace_bytes(func, args)))
        return out


def fwd_bwd(model, batch, plan) -> None:
    with recipe.autocast(plan, batch["input_ids"].device.type):
        loss = model(**batch, use_cache=False).loss
    loss.backward()


def cuda_rows(spec, plan, layers: int, sdpa: str) -> list[tuple[str, int, int]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = recipe.build_model(spec, plan, device="cuda", num_layers=layers)
    batch = recipe.make_batch(spec, plan, "cuda")
    backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[sdpa]
    with sdpa_kernel(backend):
        fwd_bwd(model, batch, plan)  # gradients exist from here on, as in a steady step
        torch.cuda.synchronize()
        log = CudaOpLog()
        with log:
            fwd_bwd(model, batch, plan)
        torch.cuda.synchronize()
    return log.rows


def trace_rows(spec, plan, layers: int, sdpa: str) -> list[tuple[str, int, int]]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = TraceOpLog(spec.vocab_size, logits_numel=plan.batch_size * plan.seq_len * spec.vocab_size // 2)
    model = recipe.build_model(spec, plan, device="meta", num_layers=layers, emulate_quant=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        trace._retie(model)
        with trace._cuda_kernel_choices(sdpa):
            batch = recipe.make_batch(spec, plan, "cpu")
            fwd_bwd(model, batch, plan)
            with tracker:
                for t in [*model.parameters(), *model.buffers()]:
                    tracker.track(t, MemCategory.PARAMETERS)
                for p in model.parameters():
                    if p.grad is not None:
                        tracker.track(p.grad, MemCategory.GRADIENTS)
                tracker.rows.clear()
                fwd_bwd(model, batch, plan)
    return tracker.rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model", default="llama-guard-3-1b")
    ap.add_argument("--precision", default="amp-fp16")
    ap.add_argument("--checkpointing", default="full")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sdpa", default="math")
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--peft", default="none")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--batch-size", type=int, default=1)
    args = ap.parse_args()
    spec = resolve_model(args.model)
    plan = Plan(precision=args.precision, checkpointing=args.checkpointing, seq_len=args.seq_len,
                batch_size=args.batch_size, attention=args.attention, peft=args.peft, quantization=args.quantization)
    fake = trace_rows(spec, plan, args.layers, args.sdpa)
    base_fake = fake[0][1]
    real = cuda_rows(spec, plan, args.layers, args.sdpa) if torch.cuda.is_available() else []
    base_real = real[0][1] if real else 0
    gib = 2**30
    lines = [f"ops: trace {len(fake)}, CUDA {len(real)}; allocated relative to the first op; GiB"]
    first_part = None
    i = j = 0
    while i < len(fake) and j < len(real):
        fname, fa, _ = fake[i]
        rname, ra, rpeak = real[j]
        if fname != rname:  # let the longer side skip an op the other does not dispatch
            if i + 1 < len(fake) and fake[i + 1][0] == rname:
                lines.append(f"{'':6s} trace only: {fname}")
                i += 1
                continue
            if j + 1 < len(real) and real[j + 1][0] == fname:
                lines.append(f"{'':6s} CUDA only: {rname} (after {(ra - base_real) / gib:.3f}, "
                             f"peak {(rpeak - base_real) / gib:.3f})")
                j += 1
                continue
        diff = (ra - base_real) - (fa - base_fake)
        inside = rpeak - ra
        if first_part is None and abs(diff) > 2**20:
            first_part = (i, j, fname, rname)
        if abs(diff) > 2**20 or inside > 2**24 or fname != rname:
            lines.append(f"{j:6d} {rname:55s} CUDA {(ra - base_real) / gib:7.3f} (peak in op "
                         f"{(rpeak - base_real) / gib:7.3f})  trace {(fa - base_fake) / gib:7.3f}  "
                         f"CUDA - trace {diff / gib:+.3f}" + ("" if fname == rname else f"  [trace op {fname}]"))
        i += 1
        j += 1
    peak_real = max((r[2] for r in real), default=0) - base_real
    peak_fake = max(f[2] for f in fake) - base_fake
    lines.insert(1, f"peak above the start: CUDA {peak_real / gib:.3f} GiB, trace {peak_fake / gib:.3f} GiB")
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(json.dumps({"args": vars(args), "summary": lines[:2], "first_part": first_part,
                                          "trace_ops": fake, "cuda_ops": real}) + "\n")
    Path(args.out).with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
