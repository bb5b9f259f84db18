"""Step time on the GPU: what the step-time model is calibrated and checked on, and what selective checkpointing costs.

    python bench/timing.py sac OUT.json [--study]       # no / selective / full checkpointing (--study: the other
                                                        # placements of selective checkpointing, profiled)
    python bench/timing.py kernels OUT.json             # matmul, attention, element-wise and launch micro-benchmarks
    python bench/timing.py kernels-2 OUT.json           # attention with an explicit mask, grouped (experts') matmuls
    python bench/timing.py kernels-kbit OUT.json        # bitsandbytes' LLM.int8 and NF4 linear layers, profiled
    python bench/timing.py profile OUT.json --plans P.json   # each case's chosen plan in a regret plans file,
                                                        # profiled: GPU time per aten op and per kernel
    python bench/timing.py gaps OUT.json                # host-bound k-bit steps as timelines: where the GPU waits
    python bench/timing.py grid OUT.jsonl [--deadline S] [--checkpointing selective] [--start I] [--set oos]
                                          [--match '"4bit"|"8bit"'] [--indices 11,12,24]
                                                        # whole steps

Every step is measured by ``memtune.validate.probe.measure_plan`` (the code ``memtune validate`` runs): one warm-up
step, then timed steps with no synchronization inside them; ``host_enqueue_s`` is how long the host took to issue a
step (close to the step time when the host, not the GPU, sets the pace). The grid appends one JSON line per plan and
skips plans OUT.jsonl already holds, so a run cut short by ``--deadline`` can be continued; each line carries the
host's pace just before and after the plan (``host_pace_s``: seconds to issue one tiny kernel).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from memtune.plan import Plan  # noqa: E402
from memtune.specs.model import resolve_model  # noqa: E402
from memtune.train import recipe  # noqa: E402
from memtune.validate.probe import measure_plan  # noqa: E402

MODELS = ("llama-guard-3-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-0.5b", "gemma-2-2b", "qwen2.5-7b",
          "mistral-7b")


def versions() -> dict:
    import peft
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "gpu_name": torch.cuda.get_device_name()}
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return out


# --- selective checkpointing --------------------------------------------------------------------------------------

def _torch_sac():
    """The previous implementation: PyTorch's own modes with a MUST_SAVE policy for matmuls and attention."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = recipe._saved_ops()
    return create_selective_checkpoint_contexts(
        lambda ctx, op, *args, **kwargs: CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE)


def _wrap_whole(context_fn):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    def checkpoint_layer(layer, checkpointing, **_):
        return checkpoint_wrapper(layer, **({"context_fn": context_fn} if checkpointing == "selective" else {}))

    return checkpoint_layer


def _regions(layer, checkpointing, **_):
    """The previous implementation: each norm and the gated MLP's tail, down(act(gate) * up), in a recomputed
    region (``recipe.recompute``: an autograd node whose backward runs the region again and differentiates it)."""
    if checkpointing == "full":
        return recipe.checkpoint_layer(layer, checkpointing)
    children = dict(layer.named_children())
    for child in children.values():
        if "Norm" in type(child).__name__:
            recipe._recompute_whole(child)
    recipe._recompute_gated_tail(children["mlp"])
    return layer


def _wrap_modules(layer, checkpointing, **_):
    """The previous placement: a checkpoint frame around each norm (recomputed whole) and around the MLP (its matmul
    outputs kept through the op-level modes); attention not checkpointed."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if checkpointing == "full":
        return checkpoint_wrapper(layer)
    for name, child in list(layer.named_children()):
        if "Norm" in type(child).__name__:
            setattr(layer, name, checkpoint_wrapper(child))
        elif name in ("mlp", "feed_forward", "block_sparse_moe"):
            setattr(layer, name, checkpoint_wrapper(child, context_fn=recipe.selective_checkpoint_context))
    return layer


SAC_VARIANTS = {
    "torch-modes": _wrap_whole(_torch_sac),
    "lean-modes": _wrap_whole(recipe.selective_checkpoint_context),
    "titan-every-other-mm": _wrap_whole(functools.partial(recipe.selective_checkpoint_context,
                                                          recipe.every_other_matmul)),
    "modules": _wrap_modules,
    "regions": _regions,
}
SAC_CASES = [("llama-guard-3-1b", 2, 1152), ("llama-guard-3-1b", 2, 2048), ("llama-3.1-8b", 2, 2048)]


def warmed_up(spec, plan, steps: int = 2):
    """The model, optimizer and batch of ``plan`` on the GPU after ``steps`` training steps, the GPU idle."""
    device = torch.device("cuda")
    model = recipe.build_model(spec, plan, device=device)
    optimizer = recipe.build_optimizer(model, plan)
    batch = recipe.make_batch(spec, plan, device)
    for _ in range(steps):
        recipe.train_step(model, optimizer, batch, plan)
    torch.cuda.synchronize()
    return model, optimizer, batch


WAITS = ("Synchronize", "Memcpy", "aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero",
         "cudaStreamWaitEvent", "cudaEventSynchronize")
"""Profiler entries where the host may wait for the GPU."""


def _profile(spec, plan) -> dict:
    """One profiled step (after two warm-up steps): host and GPU time, op and kernel counts, the top entries (by
    host time, by kernel time, and the aten ops by the GPU time of the kernels they launch), and the calls where the
    host may wait for the GPU (``waits``: synchronizations, copies, reads of a device scalar)."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer, batch = warmed_up(spec, plan)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        recipe.train_step(model, optimizer, batch, plan)
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()

    def device_us(e):
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))

    def inclusive_us(e):
        return getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))

    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA] or \
        [e for e in events if device_us(e) > 0 and not e.key.startswith("aten::")]
    aten = [e for e in events if e.key.startswith("aten::")]
    del model, optimizer, batch
    torch.cuda.empty_cache()
    return {
        "wall_s": wall, "host_enqueue_s": host,
        "gpu_kernel_s": sum(device_us(e) for e in kernels) / 1e6,
        "kernel_launches": sum(e.count for e in kernels),
        "aten_calls": sum(e.count for e in aten),
        "top_host": [{"op": e.key, "calls": e.count, "self_host_ms": e.self_cpu_time_total / 1e3}
                     for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]],
        "top_gpu": [{"kernel": e.key[:90], "calls": e.count, "ms": device_us(e) / 1e3}
                    for e in sorted(kernels, key=lambda e: -device_us(e))[:10]],
        "aten": [{"op": e.key, "calls": e.count, "gpu_ms": inclusive_us(e) / 1e3,
                  "host_ms": e.self_cpu_time_total / 1e3} for e in sorted(aten, key=lambda e: -inclusive_us(e))[:40]],
        "waits": [{"op": e.key, "calls": e.count, "host_ms": e.cpu_time_total / 1e3} for e in events
                  if any(w in e.key for w in WAITS)],
        "kernels": [{"kernel": e.key[:120], "calls": e.count, "ms": device_us(e) / 1e3}
                    for e in sorted(kernels, key=lambda e: -device_us(e))[:25]],
    }


def sac(out: Path, study: bool) -> None:
    """Step time of no, selective (memtune's), full checkpointing and the previous implementation of selective
    (``regions``, recomputed regions) at the same micro-batch; with ``study`` also
    the other placements of selective checkpointing (``SAC_VARIANTS``), profiled at 1B x 1,152 tokens."""
    rows = []
    original = recipe.checkpoint_layer
    variants = ("none", "full", "selective", "regions", *(v for v in SAC_VARIANTS if study and v != "regions"))
    for model, batch, seq in SAC_CASES:
        spec = resolve_model(model)
        steps = 3 if spec.num_params > 5e9 else 6
        for variant in variants:
            checkpointing = variant if variant in ("none", "full", "selective") else "selective"
            if spec.num_params > 5e9 and variant in ("lean-modes", "titan-every-other-mm"):
                continue
            recipe.checkpoint_layer = SAC_VARIANTS.get(variant, original)
            plan = Plan(checkpointing=checkpointing, optimizer="adamw-fused", batch_size=batch, seq_len=seq)
            try:
                m = measure_plan(spec, plan, steps=steps)
                row = {"model": model, "batch_size": batch, "seq_len": seq, "variant": variant,
                       **{k: m.get(k) for k in ("step_time_s", "host_enqueue_s", "phase_times_s", "tokens_per_s",
                                                "measured_peak_allocated_bytes", "num_alloc_retries", "error")}}
                if study and model == "llama-guard-3-1b" and seq == 1152 and variant in (
                        "none", "full", "torch-modes", "modules", "lean-modes"):
                    row["profile"] = _profile(spec, plan)
            finally:
                recipe.checkpoint_layer = original
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
    ratios = {}
    for model, batch, seq in SAC_CASES:
        case = {r["variant"]: r["step_time_s"] for r in rows if (r["model"], r["batch_size"], r["seq_len"]) ==
                (model, batch, seq) and r.get("step_time_s")}
        ratios[f"{model} {batch}x{seq}"] = {v: t / case["none"] for v, t in case.items() if "none" in case}
    result = {"versions": versions(), "command": f"python bench/timing.py sac OUT.json{' --study' * study}",
              "cases": list(ratios),
              "ratio_selective_to_none": [r.get("selective") for r in ratios.values()],
              "ratio_full_to_none": [r.get("full") for r in ratios.values()],
              "ratios_to_none": ratios, "rows": rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    for case, r in ratios.items():
        print(case, {k: round(v, 3) for k, v in r.items()})


# --- micro-benchmarks ---------------------------------------------------------------------------------------------

def _time(fn, *, min_s: float = 0.02, max_reps: int = 50) -> float:
    """Median-free mean over enough repetitions to fill ``min_s``, by CUDA events, after one warm-up call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = start.elapsed_time(end) / 1e3
    reps = max(3, min(max_reps, int(min_s / max(once, 1e-6))))
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def _dims(model: str) -> dict:
    s = resolve_model(model)
    return {"h": s.hidden_size, "q": s.num_attention_heads * s.head_dim, "kv": s.num_key_value_heads * s.head_dim,
            "i": s.intermediate_size, "V": s.vocab_size, "heads": s.num_attention_heads,
            "kv_heads": s.num_key_value_heads, "d": s.head_dim}


def kernels(out: Path) -> None:
    dev = "cuda"
    rows = {"gemm": [], "sdpa": [], "elementwise": [], "launch": {}}
    started = time.time()
    shapes = set()
    for model in MODELS:
        d = _dims(model)
        for n, k in ((d["q"], d["h"]), (d["kv"], d["h"]), (d["h"], d["q"]), (d["i"], d["h"]), (d["h"], d["i"]),
                     (d["V"], d["h"]), (16, d["h"]), (d["q"], 16)):
            shapes.add((n, k))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n, k in sorted(shapes):
            for m in (256, 1024, 2304, 4096, 8192, 16384):
                if dtype != torch.bfloat16 and (m not in (1024, 8192) or n * k > 4096 * 14336):
                    continue
                x = torch.randn(m, k, device=dev, dtype=dtype)
                w = torch.randn(n, k, device=dev, dtype=dtype)
                g = torch.randn(m, n, device=dev, dtype=dtype)
                for layout, fn, mnk in (("fwd", lambda: x @ w.t(), (m, n, k)), ("dgrad", lambda: g @ w, (m, k, n)),
                                        ("wgrad", lambda: g.t() @ x, (n, k, m))):
                    t = _time(fn)
                    rows["gemm"].append({"dtype": str(dtype).split(".")[-1], "layout": layout, "m": mnk[0],
                                         "n": mnk[1], "k": mnk[2], "s": t,
                                         "tflops": 2 * m * n * k / t / 1e12})
                del x, w, g
    print(f"gemm: {len(rows['gemm'])} in {time.time() - started:.0f} s", flush=True)
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    for model in MODELS[:6]:
        d = _dims(model)
        for seq in (512, 1152, 2048, 4096, 8192):
            for tokens in (4096, 16384):
                b = max(1, tokens // seq)
                q = torch.randn(b, d["heads"], seq, d["d"], device=dev, dtype=torch.bfloat16, requires_grad=True)
                k = torch.randn(b, d["kv_heads"], seq, d["d"], device=dev, dtype=torch.bfloat16, requires_grad=True)
                v = torch.randn_like(k, requires_grad=True)
                gqa = d["heads"] != d["kv_heads"]
                fwd = functools.partial(sdpa, q, k, v, is_causal=True, enable_gqa=gqa)
                out_ = fwd()
                grad = torch.randn_like(out_)
                t_fwd = _time(fwd)
                t_both = _time(lambda: torch.autograd.grad(fwd(), (q, k, v), grad))
                flops = 4 * b * d["heads"] * seq * seq * d["d"] / 2  # causal: half the score matrix
                rows["sdpa"].append({"model": model, "batch": b, "seq": seq, "heads": d["heads"],
                                     "kv_heads": d["kv_heads"], "head_dim": d["d"], "fwd_s": t_fwd,
                                     "bwd_s": t_both - t_fwd, "fwd_flops": flops})
                del q, k, v, out_, grad
    print(f"sdpa: {len(rows['sdpa'])} in {time.time() - started:.0f} s", flush=True)
    for dtype in (torch.bfloat16, torch.float32):
        for exp in range(10, 29, 2):
            n = 1 << exp
            a = torch.randn(n, device=dev, dtype=dtype)
            b = torch.randn(n, device=dev, dtype=dtype)
            size = a.element_size()
            for op, fn, moved in (("add", lambda: a + b, 3 * n * size), ("mul_", lambda: a.mul_(1.0), 2 * n * size),
                                  ("to_fp32" if dtype == torch.bfloat16 else "to_bf16",
                                   lambda: a.to(torch.float32 if dtype == torch.bfloat16 else torch.bfloat16),
                                   n * size + n * (4 if dtype == torch.bfloat16 else 2)),
                                  ("sum_rows", lambda: a.view(-1, 1024).sum(-1), n * size)):
                t = _time(fn)
                rows["elementwise"].append({"dtype": str(dtype).split(".")[-1], "op": op, "numel": n,
                                            "bytes": moved, "s": t, "gbs": moved / t / 1e9})
            del a, b
    for rows_, vocab in ((2048, 128256), (8192, 128256), (4096, 151936)):
        logits = torch.randn(rows_, vocab, device=dev, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, vocab, (rows_,), device=dev)
        loss = lambda: torch.nn.functional.cross_entropy(logits.float(), labels)  # noqa: E731
        t = _time(lambda: torch.autograd.grad(loss(), logits))
        rows["elementwise"].append({"dtype": "bfloat16", "op": "cross_entropy_fwd_bwd", "numel": rows_ * vocab,
                                    "bytes": rows_ * vocab * (2 + 4 + 4 + 4 + 2), "s": t,
                                    "gbs": rows_ * vocab * 16 / t / 1e9})
        del logits
    x = torch.ones(1, device=dev)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5000):
        x.add_(1.0)
    host = (time.perf_counter() - start) / 5000
    gpu = _time(lambda: [x.add_(1.0) for _ in range(1000)], min_s=0.05, max_reps=20) / 1000
    rows["launch"] = {"host_s_per_op": host, "gpu_s_per_kernel": gpu}
    print(f"elementwise and launch in {time.time() - started:.0f} s: {rows['launch']}", flush=True)
    out.write_text(json.dumps({"versions": versions(), "command": "python bench/timing.py kernels OUT.json",
                               **rows}) + "\n")


# --- whole steps --------------------------------------------------------------------------------------------------

def _p(model, peft="none", ac="none", opt="adamw", b=1, s=2048, q="none", accum=1, precision="bf16"):
    return model, Plan(peft="lora" if q != "none" else peft, quantization=q, checkpointing=ac, optimizer=opt,
                       batch_size=b, seq_len=s, grad_accum=accum, precision=precision)


L1, L3, L8, Q05, G2, M7 = "llama-guard-3-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-0.5b", "gemma-2-2b", "mistral-7b"
L1B, Q7 = "llama-3.2-1b", "qwen2.5-7b"
GRID = [
    _p(L1, b=1), _p(L1, opt="adamw-fused", b=4), _p(L1, ac="selective", opt="adamw-fused", b=2, s=1152),
    _p(L1, ac="selective", b=4), _p(L1, ac="full", b=8, s=1152), _p(L1, ac="full", opt="adamw-8bit", b=4),
    _p(L1, opt="adamw-8bit", b=2, s=1152), _p(L1, ac="selective", opt="adamw-8bit", b=2, s=4096),
    _p(L1, "lora", b=4), _p(L1, "lora", ac="selective", opt="adamw-fused", b=8, s=1024),
    _p(L1, "lora", ac="full", b=2, s=4096), _p(L1, q="4bit", b=4), _p(L1, q="4bit", ac="full", b=2),
    _p(L1, q="4bit", ac="selective", opt="adamw-fused", b=2, s=1024), _p(L1, q="8bit", b=2),
    _p(L1, opt="sgd", b=2), _p(L1, b=2, precision="amp-bf16"), _p(L1, b=2, accum=2),
    _p(L1, "lora", b=16, s=512), _p(L1, ac="full", opt="adamw-fused", b=1, s=8192),
    _p(Q05, b=4), _p(Q05, ac="selective", b=8, s=1024), _p(Q05, ac="full", opt="adamw-fused", b=16, s=1024),
    _p(Q05, "lora", b=8), _p(Q05, q="4bit", b=4), _p(Q05, opt="adamw-8bit", b=2, s=4096),
    _p(Q05, "lora", ac="selective", opt="adamw-8bit", b=4), _p(Q05, b=2, s=1024, precision="fp32"),
    _p(G2, b=2), _p(G2, ac="selective", opt="adamw-fused", b=4, s=1024), _p(G2, ac="full", b=4),
    _p(G2, "lora", b=4), _p(G2, q="4bit", ac="full", opt="adamw-fused", b=2), _p(G2, opt="adamw-8bit", s=4096),
    _p(L3, b=2), _p(L3, ac="full", b=8), _p(L3, ac="selective", b=4), _p(L3, opt="adamw-fused", b=4, s=1024),
    _p(L3, "lora", b=4), _p(L3, "lora", ac="full", opt="adamw-fused", b=8), _p(L3, q="4bit", b=2, s=4096),
    _p(L3, q="4bit", ac="selective", b=4), _p(L3, ac="selective", opt="adamw-8bit", b=2),
    _p(L3, "lora", ac="selective", opt="adamw-8bit", b=2), _p(L3, opt="sgd", b=4, s=1024),
    _p(L8, opt="adamw-fused", b=2), _p(L8, ac="full", b=4), _p(L8, ac="selective", opt="adamw-8bit", b=4),
    _p(L8, "lora", b=4), _p(L8, q="4bit", b=2), _p(L8, q="4bit", ac="full", opt="adamw-fused", b=4),
    _p(L8, "lora", ac="selective", b=2, s=4096), _p(L8, ac="full", opt="adamw-8bit", b=1, s=4096),
    _p(M7, "lora", ac="full", b=4), _p(M7, q="4bit", b=2),
    # more architectures and shapes (the held-out half of the step-time model)
    _p(M7, opt="adamw-fused", b=1), _p(M7, ac="full", b=4), _p(M7, ac="selective", opt="adamw-8bit", b=2),
    _p(M7, "lora", b=2), _p(M7, "lora", ac="selective", opt="adamw-fused", b=4, s=1024),
    _p(M7, q="4bit", ac="selective", b=4), _p(M7, q="4bit", ac="full", opt="adamw-8bit", b=2, s=4096),
    _p(M7, opt="sgd", ac="full", b=2, s=1024),
    _p(Q7, opt="adamw-fused", b=1), _p(Q7, ac="full", opt="adamw-8bit", b=2), _p(Q7, ac="selective", b=2),
    _p(Q7, "lora", b=4), _p(Q7, "lora", ac="full", opt="adamw-fused", b=8, s=1024),
    _p(Q7, q="4bit", b=2), _p(Q7, q="4bit", ac="selective", opt="adamw-fused", b=2, s=4096),
    _p(Q7, ac="selective", opt="adamw-fused", b=1, s=4096),
    _p(Q05, ac="selective", opt="adamw-fused", b=16, s=1024), _p(Q05, ac="full", b=4, s=4096),
    _p(Q05, "lora", ac="full", b=16), _p(Q05, q="4bit", ac="selective", b=8, s=1024),
    _p(Q05, opt="adamw-8bit", ac="selective", b=8), _p(Q05, b=4, s=1024, precision="amp-bf16"),
    _p(L1B, b=2), _p(L1B, ac="selective", b=8, s=1024), _p(L1B, ac="full", opt="adamw-fused", b=4, s=4096),
    _p(L1B, "lora", ac="selective", b=8), _p(L1B, q="4bit", ac="full", b=8, s=1024),
    _p(L1B, opt="adamw-8bit", ac="selective", b=4, s=2048, accum=2),
    _p(L3, ac="selective", opt="adamw-fused", b=8, s=1024), _p(L3, "lora", ac="selective", opt="adamw-fused", b=8),
    _p(L3, q="4bit", ac="full", b=8), _p(L8, ac="selective", opt="adamw-fused", b=2),
    _p(L8, "lora", ac="selective", opt="adamw-fused", b=8), _p(L8, q="4bit", ac="selective", opt="adamw-8bit", b=4),
    # LLM.int8 (bitsandbytes 8-bit) weights, and 4-bit at host-bound sizes
    _p(L1, q="8bit", b=4), _p(L1, q="8bit", ac="full", b=2, s=1024), _p(L3, q="8bit", b=2),
    _p(L3, q="8bit", ac="selective", b=4), _p(Q05, q="8bit", b=8, s=1024), _p(L8, q="8bit", b=2),
    _p(M7, q="8bit", ac="full", b=4), _p(L1B, q="8bit", ac="selective", b=8, s=1024),
    _p(L1, q="4bit", b=1, s=1024), _p(Q05, q="4bit", b=2, s=512),
    # more k-bit plans, measured before the step-time model's k-bit kernels were revised
    _p(L8, q="8bit", ac="full", b=4), _p(L8, q="8bit", ac="selective", b=2, s=4096), _p(Q7, q="8bit", b=2),
    _p(M7, q="8bit", ac="selective", b=2), _p(L3, q="8bit", ac="full", b=8, s=1024),
    _p(L1, q="8bit", ac="selective", opt="adamw-fused", b=8, s=1024), _p(Q05, q="8bit", ac="full", b=16, s=1024),
    _p(L1B, q="8bit", opt="adamw-8bit", b=2, s=4096), _p(Q7, q="8bit", ac="full", opt="adamw-fused", b=4, s=1024),
    _p(L1, q="8bit", b=1, s=512), _p(M7, q="8bit", b=1, s=4096), _p(L3, q="8bit", ac="selective", b=1, s=2048),
    _p(L1, q="4bit", ac="selective", b=4), _p(L1B, q="4bit", ac="selective", b=2, s=1024),
    _p(Q05, q="4bit", ac="selective", b=4, s=512), _p(L3, q="4bit", ac="selective", opt="adamw-fused", b=2, s=1024),
    _p(Q7, q="4bit", ac="full", b=4), _p(L8, q="4bit", b=1, s=1024), _p(M7, q="4bit", ac="selective", b=8),
    _p(L1B, q="4bit", b=16, s=1024), _p(Q05, q="4bit", ac="full", b=32, s=512), _p(L8, q="4bit", ac="selective", b=1),
]


OUT_OF_SAMPLE = [
    # estimated (bench/step_time.py --predict) before they were measured, and never fitted on
    _p(L8, q="8bit", ac="selective", b=4), _p(Q7, q="8bit", ac="selective", b=1, s=4096),
    _p(L3, q="8bit", b=4, s=1024), _p(L1B, q="8bit", ac="full", b=4), _p(M7, q="8bit", opt="adamw-fused", b=2),
    _p(Q05, q="8bit", ac="selective", b=4), _p(L8, q="4bit", ac="full", b=2, s=4096), _p(L3, q="4bit", b=8, s=1024),
    _p(Q7, q="4bit", ac="selective", b=8, s=1024), _p(L1B, q="4bit", ac="full", b=2),
    _p(M7, q="4bit", opt="adamw-8bit", b=4, s=1024), _p(L1, q="4bit", ac="selective", s=4096),
    _p(L8, ac="selective", opt="adamw-fused", b=4), _p(L3, "lora", b=2, s=4096),
    _p(Q05, ac="full", opt="adamw-8bit", b=8), _p(M7, "lora", ac="selective", b=4),
    _p(L1B, opt="adamw-fused", b=4, s=1024), _p(Q7, "lora", ac="full", b=2, s=4096),
]
OUT_OF_SAMPLE_2 = [
    # the second set, estimated with the calibration fitted on grid-median.jsonl before they were measured
    _p(L1, q="4bit", ac="full", b=4, s=1024), _p(Q05, q="4bit", ac="selective", b=2), _p(L1B, q="4bit", b=4),
    _p(L3, q="4bit", ac="full", b=4), _p(M7, q="4bit", b=1), _p(L8, q="4bit", ac="selective", opt="adamw-fused", b=2),
    _p(L1, q="8bit", ac="selective", b=2), _p(Q7, q="8bit", ac="full", b=2), _p(L3, q="8bit", b=1, s=4096),
    _p(Q05, q="8bit", ac="full", opt="adamw-fused", b=4), _p(L1B, "lora", opt="adamw-8bit", b=4),
    _p(Q05, opt="adamw-fused", b=8, s=1024), _p(L3, ac="full", opt="adamw-8bit", b=4), _p(M7, "lora", s=4096),
    _p(Q7, ac="selective", opt="sgd", b=2), _p(L8, "lora", ac="full", opt="adamw-fused", b=2, s=4096),
]
OUT_OF_SAMPLE_3 = [
    # the third set, estimated with the calibration fitted on grid-probe2.jsonl before they were measured
    _p(L1, q="4bit", ac="full", b=8, s=512), _p(Q05, q="4bit", b=8, s=1024), _p(L1B, q="4bit", ac="selective", b=4),
    _p(L3, q="4bit", ac="selective", opt="adamw-fused", b=2), _p(Q7, q="4bit", s=4096),
    _p(L1, q="8bit", ac="full", b=4), _p(Q05, q="8bit", ac="selective", b=8), _p(L1B, q="8bit", b=2),
    _p(L1, "lora", ac="selective", b=4), _p(Q05, "lora", b=4, s=4096),
    _p(L1B, ac="full", opt="adamw-8bit", b=8, s=1024),
    _p(L3, "lora", ac="full", b=4), _p(L3, ac="selective", opt="adamw-fused", b=2, s=4096),
    _p(Q05, q="4bit", ac="full", opt="adamw-fused", b=2, s=1024),
]
OUT_OF_SAMPLE_4 = [
    # the fourth set, estimated once LLM.int8's kept input and outlier columns were modelled, before measuring
    _p(L8, q="8bit", ac="full", b=2), _p(M7, q="8bit", ac="selective", b=4, s=1024),
    _p(L3, q="8bit", ac="full", b=4), _p(L1B, q="8bit", ac="selective", b=4), _p(L1, q="8bit", b=8, s=1024),
    _p(Q05, q="8bit", ac="full", b=8), _p(L8, q="8bit", b=4, s=1024), _p(Q7, q="8bit", ac="full", b=1, s=4096),
    _p(L3, q="4bit", ac="full", b=4, s=4096), _p(M7, q="4bit", ac="selective", b=2, s=4096),
]
GRIDS = {"grid": GRID, "oos": OUT_OF_SAMPLE, "oos-2": OUT_OF_SAMPLE_2, "oos-3": OUT_OF_SAMPLE_3,
         "oos-4": OUT_OF_SAMPLE_4}


def idle_gaps(trace: dict, top: int = 25) -> dict:
    """Where the GPU sat idle in a profiled step (a Chrome trace from ``torch.profiler``): the gaps between its
    busy stretches, and for each the host's work during it - the CUDA runtime calls and the aten ops (inclusive time
    overlapping the gaps, by name; nested ops count in each of their parents) and the innermost op, on the
    launching thread, that launched the kernel that ended the gap. A gap the host ends late (the launch after the
    gap's start) is host time the step pays. One sweep over the events in time order."""
    import heapq

    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    gpu = sorted(((e["ts"], e["ts"] + e["dur"], e) for e in events
                  if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda t: t[:2])
    if not gpu:
        return {}
    busy: list[list] = []
    for start, end, e in gpu:
        if busy and start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end, e])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    host = sorted((e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver")),
                  key=lambda e: e["ts"])
    by_name: dict[str, float] = {}
    launchers: dict[str, list] = {}
    idle = late = 0.0
    live: list[tuple[float, int]] = []  # (end, index) of the host events begun by the current gap's end
    j = 0
    for (_, end, _), (start, _, nxt) in zip(busy, busy[1:]):
        gap = start - end
        if gap <= 0:
            continue
        idle += gap
        while j < len(host) and host[j]["ts"] <= start:
            heapq.heappush(live, (host[j]["ts"] + host[j]["dur"], j))
            j += 1
        while live and live[0][0] < end:  # over before this gap, so before every later one
            heapq.heappop(live)
        overlapping = [host[i] for _, i in live]
        launch = launches.get(nxt.get("args", {}).get("correlation"))
        if launch is not None and launch["ts"] > end:
            late += min(gap, launch["ts"] - end)
            ops = [e for e in overlapping if e.get("cat") == "cpu_op" and e.get("tid") == launch.get("tid")
                   and e["ts"] <= launch["ts"] <= e["ts"] + e["dur"]]
            name = min(ops, key=lambda e: e["dur"])["name"] if ops else launch["name"]
            entry = launchers.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += gap
        for e in overlapping:
            overlap = min(start, e["ts"] + e["dur"]) - max(end, e["ts"])
            if overlap > 0:
                by_name[e["name"]] = by_name.get(e["name"], 0.0) + overlap
    first, last = busy[0][0], busy[-1][1]
    return {"span_ms": (last - first) / 1e3, "busy_ms": sum(b - a for a, b, _ in busy) / 1e3,
            "idle_ms": idle / 1e3, "idle_host_late_ms": late / 1e3, "gaps": len(busy) - 1,
            "host_in_gaps_ms": [{"op": k, "ms": v / 1e3}
                                for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]],
            "gap_enders": [{"op": k, "gaps": v[0], "ms": v[1] / 1e3}
                           for k, v in sorted(launchers.items(), key=lambda kv: -kv[1][1])[:top]]}


def int8_outliers(trace: dict) -> dict:
    """LLM.int8's outlier path in a profiled step: the ``int8_mixed_scaled_mm`` calls, those that multiplied
    outlier columns apart (an ``aten::addmm`` inside: the input held values of at least the threshold), and the
    GPU time of the kernels that addmm launched, by kernel name."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    mixed = [e for e in ops if e["name"] == "bitsandbytes::int8_mixed_scaled_mm"]
    addmm = [e for e in ops if e["name"] == "aten::addmm" and any(
        m["tid"] == e["tid"] and m["ts"] <= e["ts"] <= m["ts"] + m["dur"] for m in mixed)]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    kernels: dict[str, list] = {}
    for k in events:
        if k.get("cat") != "kernel":
            continue
        launch = launches.get(k.get("args", {}).get("correlation"))
        if launch and any(a["tid"] == launch["tid"] and a["ts"] <= launch["ts"] <= a["ts"] + a["dur"] for a in addmm):
            entry = kernels.setdefault(k["name"][:100], [0, 0.0])
            entry[0] += 1
            entry[1] += k["dur"] / 1e3
    return {"int8_calls": len(mixed), "outlier_calls": len(addmm),
            "outlier_addmm_ms": sum(v[1] for v in kernels.values()),
            "outlier_addmm_kernels": [{"kernel": n, "calls": v[0], "ms": v[1]}
                                      for n, v in sorted(kernels.items(), key=lambda kv: -kv[1][1])]}


GAP_PLANS = [
    ("qwen2.5-0.5b QLoRA 4x2048", *_p(Q05, q="4bit", b=4)),
    ("qwen2.5-0.5b QLoRA 2x512", *_p(Q05, q="4bit", b=2, s=512)),
    ("qwen2.5-0.5b LoRA 4x2048", *_p(Q05, "lora", b=4)),
    ("llama-guard-3-1b QLoRA full 2x2048", *_p(L1, q="4bit", ac="full", b=2)),
    ("qwen2.5-0.5b LLM.int8 8x1024", *_p(Q05, q="8bit", b=8, s=1024)),
    ("llama-3.1-8b QLoRA selective 1x2048", *_p(L8, q="4bit", ac="selective")),
    ("llama-3.2-3b LLM.int8 selective 4x2048", *_p(L3, q="8bit", ac="selective", b=4)),
    ("llama-3.1-8b LLM.int8 full 4x2048", *_p(L8, q="8bit", ac="full", b=4)),
    ("qwen2.5-7b LLM.int8 2x2048", *_p(Q7, q="8bit", b=2)),
]
"""Five host-bound k-bit steps (two of them once seen to grow with the tokens more than their kernels do), a LoRA
step beside them, and three GPU-bound LLM.int8 steps that the step-time model misses (the last three were added
after `timing/gaps.json` was measured)."""


def gaps(out: Path, match: str = "") -> None:
    """For each of ``GAP_PLANS``: one profiled step (after two warm-up steps) as a timeline, the GPU's idle gaps and
    the host's work in them (``idle_gaps``), beside the step's time measured without the profiler (the probe's
    median of five steps, before and after, to show how much the host's pace moves); the traces, gzipped, beside
    OUT for a closer look."""
    import gzip

    from torch.profiler import ProfilerActivity, profile

    rows = []
    for name, model, plan in GAP_PLANS:
        if not any(m in name for m in match.split("|")):
            continue
        spec = resolve_model(model)
        before = measure_plan(spec, plan, steps=5)
        m, opt, batch = warmed_up(spec, plan)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            recipe.train_step(m, opt, batch, plan)
            torch.cuda.synchronize()
        path = out.with_name(out.stem + "-" + name.replace(" ", "_").replace(".", "") + ".json")
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
        with gzip.open(str(path) + ".gz", "wt") as f:
            json.dump(trace, f)
        path.unlink()
        del m, opt, batch
        torch.cuda.empty_cache()
        after = measure_plan(spec, plan, steps=5)
        row = {"name": name, "model": model, "plan": plan.to_dict(),
               "step_time_s": [before.get("step_time_s"), after.get("step_time_s")],
               "step_times_s": [before.get("step_times_s"), after.get("step_times_s")],
               "phase_times_s": before.get("phase_times_s"), **idle_gaps(trace)}
        if plan.quantization == "8bit":
            row["int8_outliers"] = int8_outliers(trace)
        rows.append(row)
        print(name, row["step_time_s"], f"span {row.get('span_ms', 0):.1f} busy {row.get('busy_ms', 0):.1f} ms",
              flush=True)
        out.write_text(json.dumps({"versions": versions(), "command": "python bench/timing.py gaps OUT.json",
                                   "rows": rows}, indent=1) + "\n")


def host_pace(launches: int = 2000) -> float:
    """Seconds the host takes to issue one tiny kernel (an in-place add on 1,024 elements, the GPU idle, the median
    of five rounds): the host's pace just before and after a plan is measured, beside its step time, to tell a
    host-bound step that moved with the host from one that did not."""
    x = torch.zeros(1024, device="cuda")
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(launches // 5):
            x.add_(1.0)
        rounds.append((time.perf_counter() - start) / (launches // 5))
    torch.cuda.synchronize()
    return sorted(rounds)[2]


def grid(out: Path, deadline: float, checkpointing: str | None, start: int = 0, plans: list = GRID,
         match: str = "", indices: set[int] | None = None) -> None:
    started = time.time()
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
            if not row.get("error"):
                done.add(row["key"])
    try:
        import bitsandbytes  # noqa: F401
        has_bnb = True
    except ImportError:
        has_bnb = False
    meta = versions()
    for i, (model, plan) in enumerate(plans):
        key = f"{model} {json.dumps(plan.to_dict(), sort_keys=True)}"
        matched = any(m in key for m in match.split("|"))
        if (checkpointing and plan.checkpointing != checkpointing) or i < start or not matched or (
                indices is not None and i not in indices):
            continue
        if key in done:
            continue
        if time.time() - started > deadline:
            print(f"deadline: stopped before plan {i}", flush=True)
            break
        if not has_bnb and (plan.quantization != "none" or plan.optimizer == "adamw-8bit"):
            continue
        spec = resolve_model(model)
        t0 = time.time()
        pace = host_pace()
        m = measure_plan(spec, plan, steps=3 if spec.num_params > 5e9 else 5)
        pace_after = host_pace()
        row = {"key": key, "index": i, "model": model, "plan": plan.to_dict(), "gpu": meta["gpu_name"],
               "host_pace_s": [pace, pace_after],
               **{k: m.get(k) for k in ("step_time_s", "step_times_s", "mean_step_time_s", "host_enqueue_s",
                                        "phase_times_s", "tokens_per_s", "measured_peak_allocated_bytes",
                                        "num_alloc_retries", "error")},
               "wall_s": round(time.time() - t0, 1), "versions": meta}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(i, model, plan.peft, plan.quantization, plan.checkpointing, plan.optimizer, plan.batch_size,
              plan.seq_len, plan.grad_accum, plan.precision, m.get("step_time_s"), m.get("host_enqueue_s"),
              m.get("error"), f"{time.time() - t0:.0f}s", flush=True)


MASKED_ATTENTION = (
    # (heads, head_dim): Phi-3-mini, Llama-3.2-1B and 3.1-8B (K/V repeated: transformers passes a mask and repeats
    # them itself), Gemma-3-1B, Mistral-7B v0.1
    (32, 96), (32, 64), (32, 128), (4, 256), (8, 256))
EXPERTS = {
    # name: (experts, hidden, expert intermediate, top-k)
    "olmoe-1b-7b": (64, 2048, 1024, 8), "qwen3-30b-a3b": (128, 2048, 768, 8), "qwen1.5-moe": (60, 2048, 1408, 4),
    "mixtral-8x7b": (8, 4096, 14336, 2), "gpt-oss-20b": (32, 2880, 2880, 4)}


def kernels_2(out: Path) -> None:
    """Fused attention given an explicit mask (a sliding window shorter than the sequence: CUDA's dispatcher picks
    a kernel that takes one - cuDNN's on the H200 - and computes every block) and grouped matmuls at
    mixture-of-experts shapes
    (transformers' ``grouped_mm`` experts: tokens sorted by expert, ``x @ W[e]`` per group), forward and backward;
    whether the memory-efficient kernel takes grouped-query attention (``enable_gqa``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    dev, bf16 = "cuda", torch.bfloat16
    rows = {"sdpa_masked": [], "grouped_mm": [], "versions": versions()}
    started = time.time()
    for heads, d in MASKED_ATTENTION:
        for seq in (1152, 2048, 4096):
            for tokens in (4096, 16384):
                b = max(1, tokens // seq)
                q, k, v = (torch.randn(b, heads, seq, d, device=dev, dtype=bf16, requires_grad=True)
                           for _ in range(3))
                i = torch.arange(seq, device=dev)
                mask = ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < seq // 2)).expand(b, 1, seq, seq)
                fwd = functools.partial(sdpa, q, k, v, attn_mask=mask)
                grad = torch.randn_like(q)
                t_fwd = _time(fwd)
                t_both = _time(lambda: torch.autograd.grad(fwd(), (q, k, v), grad))
                t_causal = _time(functools.partial(sdpa, q, k, v, is_causal=True))
                rows["sdpa_masked"].append({"batch": b, "seq": seq, "heads": heads, "head_dim": d, "fwd_s": t_fwd,
                                            "bwd_s": t_both - t_fwd, "fwd_flops": 4 * b * heads * seq * seq * d,
                                            "causal_fwd_s": t_causal})
                del q, k, v, mask, grad
    q = torch.randn(1, 8, 256, 64, device=dev, dtype=bf16)
    kv = torch.randn(1, 2, 256, 64, device=dev, dtype=bf16)
    try:
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            sdpa(q, kv, kv, is_causal=True, enable_gqa=True)
        rows["efficient_takes_gqa"] = True
    except RuntimeError:
        rows["efficient_takes_gqa"] = False
    print(f"sdpa masked: {len(rows['sdpa_masked'])} in {time.time() - started:.0f} s", flush=True)
    grouped = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    for name, (experts, hidden, inter, top_k) in EXPERTS.items():
        for tokens in (2048, 8192, 16384):
            rows_ = tokens * top_k
            ids = torch.randint(0, experts, (rows_,), device=dev).sort().values
            offs = torch.cumsum(torch.bincount(ids, minlength=experts), 0).to(torch.int32)
            for proj, (k_, n_) in (("gate_up", (hidden, 2 * inter)), ("down", (inter, hidden))):
                x = torch.randn(rows_, k_, device=dev, dtype=bf16, requires_grad=True)
                w = torch.randn(experts, n_, k_, device=dev, dtype=bf16, requires_grad=True)
                fwd = functools.partial(lambda x, w: grouped(x, w.transpose(-2, -1), offs=offs), x, w)
                grad = torch.randn(rows_, n_, device=dev, dtype=bf16)
                t_fwd = _time(fwd)
                t_both = _time(lambda: torch.autograd.grad(fwd(), (x, w), grad))
                rows["grouped_mm"].append({"model": name, "proj": proj, "tokens": tokens, "rows": rows_,
                                           "experts": experts, "k": k_, "n": n_, "fwd_s": t_fwd,
                                           "bwd_s": t_both - t_fwd, "fwd_flops": 2 * rows_ * k_ * n_})
                del x, w, grad
    print(f"grouped mm: {len(rows['grouped_mm'])} in {time.time() - started:.0f} s", flush=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")


KBIT_SHAPES = {
    # (out_features, in_features): Llama-Guard-3-1B's q/o, k/v, gate/up, down; Llama-3.1-8B's; Qwen2.5-0.5B's k/v
    "llama-guard-3-1b": ((2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)),
    "llama-3.1-8b": ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)),
    "qwen2.5-0.5b": ((128, 896), (4864, 896)),
    # Llama-3.2-3B's and Qwen2.5-7B's (the LLM.int8 plans the step-time model misses most)
    "llama-3.2-3b": ((3072, 3072), (1024, 3072), (8192, 3072), (3072, 8192)),
    "qwen2.5-7b": ((3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)),
}


def kernels_kbit(out: Path, match: str = "") -> None:
    """bitsandbytes' k-bit linear layers as a (Q)LoRA fine-tune runs them (frozen weight, bf16 input whose gradient
    is needed): forward and forward + backward by CUDA events (back to back, host gaps included), the kernels one
    forward and backward launch with their GPU time (profiled), and the host time of a call at 16 rows (where the
    product is short; LLM.int8's syncs still wait for the weight's dequantization, which does not depend on the
    rows); a bf16 ``nn.Linear`` beside them."""
    import bitsandbytes as bnb
    from torch.profiler import ProfilerActivity, profile

    dev, bf16 = "cuda", torch.bfloat16
    rows, started = [], time.time()

    def layer_of(kind, n, k):
        linear = torch.nn.Linear(k, n, bias=False, dtype=bf16)
        if kind == "bf16":
            return linear.to(dev).requires_grad_(False)
        if kind == "8bit":
            layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0, device="meta")
            layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False).to(dev)
            return layer
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=bf16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to(dev)
        return layer

    for model, shapes in KBIT_SHAPES.items():
        if not any(m in model for m in match.split("|")):
            continue
        for n, k in shapes:
            for kind in ("bf16", "8bit", "4bit"):
                layer = layer_of(kind, n, k)
                for m in (16, 1024, 4096, 16384):
                    x = torch.randn(m, k, device=dev, dtype=bf16, requires_grad=True)
                    g = torch.randn(m, n, device=dev, dtype=bf16)
                    both = lambda: torch.autograd.grad(layer(x), x, g)  # noqa: E731
                    row = {"model": model, "kind": kind, "m": m, "n": n, "k": k, "flops": 2.0 * m * n * k}
                    if m == 16:
                        for name, fn in (("fwd", lambda: layer(x)), ("both", both)):
                            fn()
                            torch.cuda.synchronize()
                            t = time.perf_counter()
                            for _ in range(50):
                                fn()
                            row[f"host_{name}_s"] = (time.perf_counter() - t) / 50
                            torch.cuda.synchronize()
                    row["fwd_s"] = _time(lambda: layer(x))
                    row["both_s"] = _time(both)
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for _ in range(2):
                            both()
                        torch.cuda.synchronize()
                    kernels = {}  # per forward and backward: calls and GPU microseconds, by name cut at 100
                    for e in prof.key_averages():
                        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
                            us = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
                            calls, total = kernels.get(e.key[:100], (0.0, 0.0))
                            kernels[e.key[:100]] = [calls + e.count / 2, total + us / 2]
                    syncs = sum(e.count for e in prof.key_averages() if e.key in (
                        "cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item", "aten::_local_scalar_dense"))
                    row.update(kernels=kernels, kernel_s=sum(v[1] for v in kernels.values()) / 1e6,
                               host_syncs=syncs / 2)
                    rows.append(row)
                    del x, g
                del layer
                torch.cuda.empty_cache()
        print(f"{model}: {len(rows)} rows in {time.time() - started:.0f} s", flush=True)
        out.write_text(json.dumps({"versions": versions(), "command": "python bench/timing.py kernels-kbit OUT.json",
                                   "rows": rows}, indent=1) + "\n")


def profile_plans(out: Path, plans_file: Path) -> None:
    """One profiled step of the chosen plan of each case on the GPU itself (``bench/regret.py plan``): the aten ops
    and kernels that take the GPU's time, to set beside the trace's op by op."""
    rows = []
    for case in json.loads(plans_file.read_text())["cases"]:
        if case["emulated"]:
            continue
        profiled = _profile(resolve_model(case["model"]), Plan.from_dict(case["chosen"]))
        rows.append({"name": case["name"], "plan": case["chosen"],
                     **{k: profiled[k] for k in ("wall_s", "gpu_kernel_s", "aten", "kernels", "waits")}})
        print(case["name"], f"{profiled['wall_s']:.3f} s", flush=True)
        out.write_text(json.dumps({"versions": versions(), "cases": rows}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("sac", "kernels", "kernels-2", "kernels-kbit", "grid", "profile", "gaps"))
    ap.add_argument("--plans", type=Path, help="profile: a bench/regret.py plans file")
    ap.add_argument("out")
    ap.add_argument("--deadline", type=float, default=1e9, help="grid: start no plan after this many seconds")
    ap.add_argument("--checkpointing", choices=("none", "selective", "full"), default=None,
                    help="grid: only the plans with this checkpointing")
    ap.add_argument("--start", type=int, default=0, help="grid: only the plans from this index on")
    ap.add_argument("--indices", default=None, help="grid: only these plans (comma-separated indices)")
    ap.add_argument("--match", default="",
                    help='grid: only the plans whose key holds one of these texts (\'"4bit"|"8bit"\'); gaps and '
                         'kernels-kbit: only the plans or models whose name holds one')
    ap.add_argument("--set", choices=sorted(GRIDS), default="grid",
                    help="grid: the plans to measure (oos, oos-2: the out-of-sample checks of the step-time model)")
    ap.add_argument("--study", action="store_true", help="sac: every placement of selective checkpointing")
    args = ap.parse_args()
    # cuBLAS handles and workspaces exist before anything is measured
    a = torch.randn(256, 256, device="cuda", requires_grad=True)
    (a @ a).sum().backward()
    del a
    {"sac": lambda: sac(Path(args.out), args.study), "kernels": lambda: kernels(Path(args.out)),
     "kernels-2": lambda: kernels_2(Path(args.out)), "kernels-kbit": lambda: kernels_kbit(Path(args.out), args.match),
     "profile": lambda: profile_plans(Path(args.out), args.plans), "gaps": lambda: gaps(Path(args.out), args.match),
     "grid": lambda: grid(Path(args.out), args.deadline, args.checkpointing, args.start, GRIDS[args.set],
                          args.match, {int(i) for i in args.indices.split(",")} if args.indices else None),
     }[args.what]()


if __name__ == "__main__":
    main()
