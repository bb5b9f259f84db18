"""Time the estimator on this machine's CPU: the first estimate of an architecture (nothing cached) and a repeat
(trace cached on disk, and in memory).

    python bench/speed.py   # writes bench/results/speed.json
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    os.environ["MEMTUNE_CACHE"] = tempfile.mkdtemp(prefix="memtune-speed-")
    t0 = time.perf_counter()
    import torch
    import transformers

    from memtune.estimate import estimate
    from memtune.estimate.compose import cached_trace
    from memtune.plan import Plan
    from memtune.specs import resolve_gpu, resolve_model

    import_s = time.perf_counter() - t0
    gpu = resolve_gpu("L4-24GB")
    rows = []
    for model in ("llama-guard-3-1b", "qwen2.5-7b", "llama-3.1-8b"):
        t = time.perf_counter()
        spec = resolve_model(model)
        spec_s = time.perf_counter() - t
        for label, kwargs, plan in (
            ("full-depth", {}, Plan(batch_size=1, seq_len=2048, checkpointing="full")),
            ("fast (two depths)", {"fast": True}, Plan(batch_size=1, seq_len=2048, peft="lora")),
            ("full-depth FSDP x8", {}, Plan(batch_size=1, seq_len=2048, sharding="fsdp", num_gpus=8)),
        ):
            t = time.perf_counter()
            estimate(spec, plan, gpu, **kwargs)
            first = time.perf_counter() - t
            cached_trace.cache_clear()
            t = time.perf_counter()
            estimate(spec, plan, gpu, **kwargs)
            from_disk = time.perf_counter() - t
            t = time.perf_counter()
            estimate(spec, plan, gpu, **kwargs)
            in_memory = time.perf_counter() - t
            rows.append({"model": model, "mode": label, "first_s": round(first, 3), "cached_disk_s": round(from_disk, 4),
                         "cached_memory_s": round(in_memory, 5), "model_spec_s": round(spec_s, 3)})
            print(rows[-1], flush=True)
    from memtune.planner import plan_candidates

    spec = resolve_model("llama-3.1-8b")
    search = []
    for attempt in ("first (nothing cached)", "repeat (traces cached)"):
        cached_trace.cache_clear()
        t = time.perf_counter()
        result = plan_candidates(spec, resolve_gpu("A100-80GB"), num_gpus=8, seq_len=4096, global_batch=64)
        search.append({"attempt": attempt, "seconds": round(time.perf_counter() - t, 2),
                       "candidates": len(result.candidates)})
        print(search[-1], flush=True)
    out = {"command": "python bench/speed.py",
           "plan_search": {"model": "llama-3.1-8b", "gpu": "8 x A100-80GB", "seq_len": 4096, "global_batch": 64,
                           "runs": search}, "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "import_s": round(import_s, 2), "rows": rows}
    (ROOT / "bench" / "results" / "speed.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
