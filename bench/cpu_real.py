"""memtune's fake-tensor trace against a real execution of the same training step on this CPU.

    python bench/cpu_real.py   # writes bench/results/cpu_real.json (a few minutes on 2 cores)

For a small Llama-shaped model whose attention dominates (``bench/assets/attn-heavy``: hidden 256, 8 query / 2 KV
heads, 2 layers), one training step runs for real on the CPU with SDPA's math kernel (the kernel a V100 uses for
grouped-query attention) under PyTorch's profiler, which records every allocation and free
(``torch.profiler._memory_profiler``); its peak, plus the weights, buffers and optimizer states held before the step,
is set against the trace's largest phase peak. Agreement here means the trace replays the real step's allocations;
what is left between an estimate and a CUDA measurement is then the CUDA kernels' own doing.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODEL = ROOT / "bench" / "assets" / "attn-heavy"
CASES = [  # (precision, checkpointing, sequence length)
    ("amp-fp16", "full", 1024), ("fp32", "full", 1024), ("amp-fp16", "none", 1024), ("fp32", "none", 1024),
    ("bf16", "none", 1024), ("amp-fp16", "full", 4096),
]


def real_peak(spec, plan, depth: int) -> int:
    """Bytes held at the real step's highest point: what was held before it plus the profiler's timeline peak."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    from memtune.train import recipe

    torch.manual_seed(0)
    model = recipe.build_model(spec, plan, device="cpu", num_layers=depth)
    optimizer = recipe.build_optimizer(model, plan, foreach=True)
    batch = recipe.make_batch(spec, plan, "cpu")
    with sdpa_kernel(SDPBackend.MATH):
        recipe.train_step(model, optimizer, batch, plan)  # creates the optimizer states, as the trace's warm-up does
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            recipe.train_step(model, optimizer, batch, plan)
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    held = {}
    for t in [*model.parameters(), *model.buffers(), *(v for s in optimizer.state.values() for v in s.values())]:
        if isinstance(t, torch.Tensor):
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(held.values()) + peak


def main() -> None:
    from memtune.estimate import Phase
    from memtune.estimate.trace import trace_step
    from memtune.plan import Plan
    from memtune.specs import resolve_model

    spec, depth = resolve_model(str(MODEL)), 2
    rows = []
    for precision, checkpointing, seq_len in CASES:
        plan = Plan(precision=precision, checkpointing=checkpointing, batch_size=1, seq_len=seq_len)
        real = real_peak(spec, plan, depth)
        trace = trace_step(spec, plan, depth, sdpa_backend="math")
        traced = max(trace.phase_peak(p) for p in Phase)
        rows.append({"precision": precision, "checkpointing": checkpointing, "seq_len": seq_len,
                     "real_peak_bytes": real, "trace_peak_bytes": traced, "error": traced / real - 1})
        print(json.dumps(rows[-1]), flush=True)
    out = {"command": "python bench/cpu_real.py", "model": str(MODEL.relative_to(ROOT)), "layers": depth,
           "attention": "sdpa math", "torch": torch.__version__, "cpu": platform.machine(), "rows": rows}
    (ROOT / "bench" / "results" / "cpu_real.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
