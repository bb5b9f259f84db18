"""Calibrate the step-time model on the H200 and report it on held-out plans (on the CPU, from measured data).

    python bench/step_time.py [--grid GRID.jsonl [REPEAT.jsonl ...]] [--out bench/results/step_time.json]
                              [--write-calibration]
    python bench/step_time.py --predict oos-3   # estimate an out-of-sample set before it is measured

1. The GPU efficiencies from the micro-benchmarks (``bench/timing.py kernels``): matmuls and fused attention
   (``t = t0 + F / (peak x e_max)``), and the bandwidth share of element-wise kernels.
   The int8 product and the memory-bound kernels of bitsandbytes' k-bit layers from ``bench/timing.py kernels-kbit``.
2. The host constants, the 8-bit AdamW rate, the matmul and bandwidth shares from whole steps
   (``bench/timing.py grid``, the median step of each measurement, the median of a plan's measurements): fitted on
   the plans of even index, reported on those of odd index (held out), each against the trace of its plan; then
   the other way round (``heldout_both_folds``: every plan held out once).
3. The closed-form cost model (``memtune.planner.cost.step_cost``) on the same held-out plans, for comparison.

4. The out-of-sample checks: plans estimated (``--predict SET``, with the shipped calibration) before they were
   measured (``bench/timing.py grid bench/results/timing/SET.jsonl --set SET``) and never fitted on.
5. The noise floor: the grid's plans measured again later in the session (``reproducibility``).

``--write-calibration`` stores the constants in ``profiles/calibration/H200-141GB.json`` (``step_time``), which the
planner reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from memtune.errors import InvalidPlanError  # noqa: E402
from memtune.estimate.compose import cached_trace, fast_depth, sdpa_backend  # noqa: E402
from memtune.plan import Plan  # noqa: E402
from memtune.planner.cost import step_cost  # noqa: E402
from memtune.planner.steptime import (  # noqa: E402
    _BANDWIDTH_KINDS, Calibration, _op_table, error_class, host_layer_key, host_per_layer, step_time)
from memtune.specs.gpu import resolve_gpu  # noqa: E402
from memtune.specs.model import resolve_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GPU = "H200-141GB"
STEP_FITTED = ("host_op_s", "host_view_s", "host_frame_s", "host_selective_s", "host_tensor_s", "mem_efficiency",
               "mm_e_max", "adam8bit_rate", "adam8bit_tensor_s")
KBIT_FITTED = ("host_kbit_s", "host_kbit8_s", "host_kbit_bwd_s", "host_kbit8_tail_s", "sync_s", "host_region_s")
"""Fitted on the k-bit plans alone, once the others are fixed by the other plans: bitsandbytes' host work and
LLM.int8's syncs, and the recomputed regions (selective checkpointing's MLP tail where the down projection is a
k-bit layer)."""


def fit_kernels(kernels: dict, gpu, kernels_2: dict | None = None) -> dict:
    """GPU efficiencies from the micro-benchmarks (kernels long enough that the host's launch rate does not set
    their time)."""
    def fit(points, peak_of):
        """(e_max, t0) of ``t = t0 + F / (peak x e_max)`` with the least squared log error."""
        best = None
        for e in np.linspace(0.4, 1.0, 61):
            for t0 in np.geomspace(1e-6, 2e-4, 81):
                err = sum(math.log(t / (t0 + fl / (peak_of(d) * e))) ** 2 for fl, t, d in points)
                best = min(best or (err, e, t0), (err, e, t0))
        return float(best[1]), float(best[2])

    peaks = {"bfloat16": gpu.tflops["bf16"] * 1e12, "float16": gpu.tflops["fp16"] * 1e12,
             "float32": gpu.tflops["fp32"] * 1e12}
    mm = [(2.0 * r["m"] * r["n"] * r["k"], r["s"], r["dtype"]) for r in kernels["gemm"] if r["s"] > 30e-6]
    mm_e, mm_t0 = fit(mm, peaks.get)
    attn = [(r["fwd_flops"], r["fwd_s"], "bfloat16") for r in kernels["sdpa"] if r["fwd_s"] > 30e-6]
    attn_e, attn_t0 = fit(attn, peaks.get)
    ratios = [r["bwd_s"] / r["fwd_s"] for r in kernels["sdpa"] if r["fwd_s"] > 100e-6]
    big = [r["gbs"] for r in kernels["elementwise"] if r["numel"] >= 1 << 22 and r["op"] in ("add", "mul_", "sum_rows")]
    out = {"mm_e_max": mm_e, "mm_t0": mm_t0, "attn_e_max": attn_e, "attn_t0": attn_t0,
           "attn_bwd_factor": float(statistics.median(ratios)),
           "mem_efficiency": float(statistics.median(big) / gpu.bandwidth_gbs)}
    if kernels_2:  # attention given a mask, grouped matmuls (bench/timing.py kernels-2)
        masked = [(r["fwd_flops"], r["fwd_s"], "bfloat16") for r in kernels_2["sdpa_masked"] if r["fwd_s"] > 30e-6]
        out["masked_attn_e_max"], out["masked_attn_t0"] = fit(masked, peaks.get)
        out["masked_attn_bwd_factor"] = float(statistics.median(r["bwd_s"] / r["fwd_s"]
                                                                for r in kernels_2["sdpa_masked"]))
        # forward and backward (the input's and the weights' gradients: two grouped matmuls of the forward's FLOPs)
        grouped = [(r["fwd_flops"], r["fwd_s"], "bfloat16") for r in kernels_2["grouped_mm"] if r["fwd_s"] > 30e-6]
        grouped += [(r["fwd_flops"], r["bwd_s"] / 2, "bfloat16") for r in kernels_2["grouped_mm"]
                    if r["bwd_s"] > 60e-6]
        out["gmm_e_max"], out["gmm_t0"] = fit(grouped, peaks.get)
    return out


def _kbit_class(kernel: str) -> str | None:
    """The step-time model's kind of a kernel profiled by ``bench/timing.py kernels-kbit``."""
    if "gemm_s8" in kernel:
        return "mm8"
    for prefix, kind in (("void kInt8VectorQuant", "q8"), ("void kdequant_mm", "dq8"),
                         ("void kDequantizeBlockwise", "nf4")):
        if kernel.startswith(prefix):
            return kind
    # (kernel names are cut at 100 characters)
    if "direct_copy_kernel" in kernel and "unrolled" in kernel or "BinaryFunctor<fl" in kernel:
        return "cast"
    return None


def fit_kbit_kernels(kernels_kbit: dict, gpu) -> tuple[dict, dict]:
    """The int8 product's efficiency and the bandwidth shares of bitsandbytes' kernels and of PyTorch's
    non-vectorized casts, from the profiled k-bit layers: each kernel class's measured time per forward and backward
    against what ``memtune.train.quant`` says those kernels do (FLOPs, bytes). Returns the constants and, per class,
    the median and largest |error| of the fitted times over the layers measured."""
    from memtune.train.quant import llm_int8_kernels, nf4_kernels

    bandwidth = gpu.bandwidth_gbs * 1e9
    points = {"mm8": [], **{kind: [] for kind in _BANDWIDTH_KINDS}}
    for r in kernels_kbit["rows"]:
        if r["kind"] == "bf16" or r["m"] < 1024:
            continue
        if r["kind"] == "8bit":
            notes = [n for phase in ("forward", "backward")
                     for n in llm_int8_kernels(r["m"], r["n"], r["k"], torch.bfloat16, phase)]
            # kernels-kbit.json (9015420) kept one entry per kernel name cut at 100 characters: of the copies, the
            # two into bf16 (the output's cast and the weight's); the input's cast to fp16 is not in the profile
            notes.remove(next(n for n in notes if n[0] == "cast"))
        else:
            notes = [n for phase in ("forward", "backward") for n in nf4_kernels(r["m"], r["n"], r["k"], 2, phase)]
        measured = {}
        for kernel, (_, us) in r["kernels"].items():  # calls and GPU microseconds per forward and backward
            cls = _kbit_class(kernel)
            if cls is not None:
                measured[cls] = measured.get(cls, 0.0) + us / 1e6
        for cls, t in measured.items():
            work = sum(n[1] if cls == "mm8" else n[2] for n in notes if n[0] == cls)
            if work and t > 20e-6:
                points[cls].append((work, t, sum(n[0] == cls for n in notes)))

    def loss(predict, pts):
        return sum(math.log(t / predict(w, n)) ** 2 for w, t, n in pts)

    out, quality = {}, {}
    peak = gpu.peak_flops("int8")
    best = min((loss(lambda w, n: t0 + w / (peak * e), points["mm8"]), e, t0)
               for e in np.linspace(0.2, 1.0, 81) for t0 in np.geomspace(1e-6, 2e-4, 41))
    out["mm8_e_max"], out["mm8_t0"] = float(best[1]), float(best[2])
    def at_share(e):
        """Time of kernels moving ``w`` bytes in ``n`` launches at a share ``e`` of the bandwidth."""
        return lambda w, n: w / (bandwidth * e) + n * Calibration().kernel_s

    predict = {"mm8": lambda w, n: out["mm8_t0"] + w / (peak * out["mm8_e_max"])}
    for cls, name in _BANDWIDTH_KINDS.items():
        out[name] = float(min(np.linspace(0.05, 1.0, 191), key=lambda e: loss(at_share(e), points[cls])))
        predict[cls] = at_share(out[name])
    for cls, pts in points.items():
        errs = [abs(predict[cls](w, n) / t - 1) for w, t, n in pts]
        quality[cls] = {"n": len(errs), "median_abs_err": statistics.median(errs), "max_abs_err": max(errs)}
    return out, quality


def fit_unaligned_matmuls(gaps: dict, mm_t0: float, gpu) -> tuple[dict, dict]:
    """The efficiency of LLM.int8's unaligned outlier products (``mm_unaligned``) from profiled whole steps
    (``bench/timing.py gaps``: the GPU time of the kernels its ``addmm`` launched), against the trace's FLOPs of
    those products, pooled over the steps where the trace has them; each step's error at that efficiency."""
    points = []
    for row in gaps["rows"]:
        measured = (row.get("int8_outliers") or {}).get("outlier_addmm_ms")
        if not measured:
            continue
        spec, plan, gpu_, trace = traced(row)
        ops = [op for op in trace.ops if op.kind == "mm_unaligned" and op.micro_batch <= 0]
        if not ops:  # every column an outlier column: an aligned product (``mm``)
            continue
        table = _op_table(ops, spec, plan, gpu_, trace.num_layers, trace.period)
        points.append((row["name"], float((table.flops / table.peak * table.repeat).sum()),
                       float(table.repeat.sum()) * mm_t0, measured / 1e3))
    if not points:
        return {}, {}
    e = sum(w for _, w, _, _ in points) / sum(t - t0 for _, _, t0, t in points)
    rows = [{"plan": name, "measured_s": t, "model_s": t0 + w / e, "error": (t0 + w / e) / t - 1}
            for name, w, t0, t in points]
    return {"mm_unaligned_e_max": e}, {"source": "bench/results/timing/gaps-2.json", "rows": rows}


GRID_FILE = ROOT / "bench/results/timing/grid-probe2.jsonl"
"""The grid as measured by the probe that times the median step with Python's collector kept out of the steps and
reads the allocator once per phase boundary (``memtune.validate.probe``); the older ``grid*.jsonl`` files were
measured with more of the probe's own host work inside the steps."""
REPEATS = [ROOT / "bench/results/timing/grid-probe2-repeat.jsonl",
           ROOT / "bench/results/timing/grid-probe2-repeat-2.jsonl",
           ROOT / "bench/results/timing/grid-probe2-tail.jsonl",
           ROOT / "bench/results/timing/grid-probe2-repeat-3.jsonl"]
"""Later measurements of some of the grid's plans (the k-bit ones, the host-bound small k-bit ones twice, in the
grid's lease; eight of the k-bit plans the model missed most a third time, in a later lease, with the plans
118-120 the first lease did not reach, ``grid-probe2-tail.jsonl``): a plan's step is the median of its
measurements, and how far they move from one measurement to the next is the noise floor (``reproducibility``)."""


def load_rows(paths: list[Path]) -> list[dict]:
    """Measured steps by plan, in the grid's order: a plan measured more than once (in several files) gets the
    median of its measurements as ``step_time_s`` and all of them as ``measurements``."""
    rows: dict[str, dict] = {}
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("step_time_s") and not r.get("error"):
                rows.setdefault(r["key"], {**r, "measurements": []})["measurements"].append(r["step_time_s"])
    for r in rows.values():
        r["step_time_s"] = statistics.median(r["measurements"])
    return sorted(rows.values(), key=lambda r: r["index"])


def reproducibility(grid: Path, repeats: list[Path]) -> dict | None:
    """|repeat / first - 1| over the plans measured again: the noise floor of one measured step (host-bound steps
    move with the host's pace)."""
    measured = {r["key"]: r["step_time_s"] for r in load_rows([grid])}
    diffs = [r["step_time_s"] / measured[r["key"]] - 1 for path in repeats if path.is_file()
             for r in load_rows([path]) if r["key"] in measured]
    if not diffs:
        return None
    return {"source": [str(p.relative_to(ROOT)) for p in repeats if p.is_file()], **summary(diffs),
            "repeat_slower": sum(d > 0.05 for d in diffs), "repeat_faster": sum(d < -0.05 for d in diffs)}


def traced(row: dict):
    spec = resolve_model(row["model"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in row["plan"].items()}
    if "kbit_upcast" not in fields and fields.get("quantization", "none") != "none":
        fields["kbit_upcast"] = True  # measured when peft's fp32 upcast was the only k-bit preparation
    plan = Plan(**fields)
    gpu = resolve_gpu(GPU)
    return spec, plan, gpu, cached_trace(spec, plan, fast_depth(spec), sdpa_backend(spec, plan, gpu))


def errors(cases, cal: Calibration) -> list[float]:
    return [step_time(spec, plan, gpu, trace, cal).step_s / row["step_time_s"] - 1
            for row, (spec, plan, gpu, trace) in cases]


def fit_steps(cases, start: Calibration) -> Calibration:
    """Coordinate descent in log space on the squared log errors of the fitting plans and ``PRIOR_WEIGHT``'s prior
    around ``start`` (the micro-benchmarks' constants): ``STEP_FITTED`` on the plans without k-bit weights, then
    ``KBIT_FITTED`` on those with (so that the k-bit plans, whose host work the model knows least, do not bend the
    constants every plan shares)."""
    plain = [c for c in cases if error_class(c[1][1]) != "kbit"]
    kbit = [c for c in cases if error_class(c[1][1]) == "kbit"]
    return _descend(kbit, _descend(plain, start, STEP_FITTED, start), KBIT_FITTED, start)


PRIOR_WEIGHT = 0.003
"""A weak prior: each fitted constant pays ``PRIOR_WEIGHT x log(value / prior)**2``, the prior being the
micro-benchmarks' value where they measured the constant and ``Calibration``'s default elsewhere - as much as a 5 %
error on one plan for a factor of 2.5. Constants the measured steps cannot tell apart (a k-bit
layer's host work in forward and in backward, LLM.int8's syncs and its Python layer) then stay near physical values
instead of one of them drifting to zero."""


def _descend(cases, start: Calibration, names, prior: Calibration) -> Calibration:
    def loss(c):
        return sum(math.log1p(e) ** 2 for e in errors(cases, c)) + PRIOR_WEIGHT * sum(
            math.log(getattr(c, n) / getattr(prior, n)) ** 2 for n in names)

    cal, best = start, loss(start)
    step = 1.0
    while step > 0.02:
        improved = False
        for name in names:
            for factor in (math.exp(step), math.exp(-step)):
                trial = dataclasses.replace(cal, **{name: getattr(cal, name) * factor})
                value = loss(trial)
                if value < best:
                    cal, best, improved = trial, value, True
        if not improved:
            step /= 2
    return cal


def host_layers(cal: Calibration) -> dict[str, float]:
    """Host seconds per decoder layer and micro-batch for each kind of fine-tune and checkpointing (Llama-Guard-3-1B
    at 2 x 1,152 tokens), for the closed-form cost model."""
    spec, gpu = resolve_model("llama-guard-3-1b"), resolve_gpu(GPU)
    out = {}
    for kind in ({"peft": "none"}, {"peft": "lora"}, {"peft": "lora", "quantization": "4bit"}):
        for ac in ("none", "selective", "full"):
            plan = Plan(**kind, checkpointing=ac, batch_size=2, seq_len=1152)
            trace = cached_trace(spec, plan, fast_depth(spec), sdpa_backend(spec, plan, gpu))
            out[host_layer_key(plan)] = host_per_layer(spec, plan, gpu, trace, cal)
    return out


def int8_call_host(kernels_kbit: dict, cal: Calibration) -> dict:
    """The fitted host time of one LLM.int8 forward call (its Python layer, the path after its second sync, two
    returns from a sync and a launch per kernel), fitted on whole steps, against the host time of such a call
    timed alone (``bench/timing.py kernels-kbit``: 50 calls at 16 rows, where the GPU's work is short) - a check
    the fit never saw. (NF4 has no such check: at 16 rows bitsandbytes runs a fused kernel, not the path a training
    step takes.)"""
    from memtune.train.quant import llm_int8_kernels

    notes = llm_int8_kernels(16, 64, 64, torch.bfloat16, "forward")
    launched = sum(n[0] not in ("kbit", "kbit8_tail", "sync") for n in notes)
    model = (cal.host_kbit8_s + cal.host_kbit8_tail_s + cal.sync_s * sum(n[0] == "sync" for n in notes)
             + cal.host_op_s * launched)
    timed = [r["host_fwd_s"] for r in kernels_kbit["rows"] if r["kind"] == "8bit" and "host_fwd_s" in r]
    if not timed:
        return {}
    return {"model_s": model, "timed_median_s": statistics.median(timed), "timed_min_s": min(timed),
            "timed_max_s": max(timed), "n": len(timed), "error": model / statistics.median(timed) - 1}


def other_architectures(path: Path, cal: Calibration) -> dict:
    """The fitted model against steps of architectures the grid does not hold (measured on the H200 itself by
    ``bench/regret.py measure``; the cases under a smaller card's cap are left out)."""
    rows = []
    for case in json.loads(path.read_text())["cases"]:
        if case["emulated"]:
            continue
        for r in case["measured"]:
            if not r.get("measured_step_time_s"):
                continue
            spec, plan = resolve_model(case.get("model") or _model_of(path, case["name"])), Plan.from_dict(r["plan"])
            gpu = resolve_gpu(case["gpu"])
            trace = cached_trace(spec, plan, fast_depth(spec), sdpa_backend(spec, plan, gpu))
            t = step_time(spec, plan, gpu, trace, cal)
            rows.append({"case": case["name"], "label": r["label"], "measured_step_s": r["measured_step_time_s"],
                         "estimated_step_s": t.step_s, "error": t.step_s / r["measured_step_time_s"] - 1})
    return {"source": str(path.relative_to(ROOT)), **summary([r["error"] for r in rows]), "rows": rows}


WINNER_CASES = [ROOT / f"bench/results/{name}.json" for name in ("regret", "regret-1b", "architectures",
                                                                   "architectures-2")]
"""Cases of ``bench/regret.py measure``: a planner's choice and its alternatives, each measured on the H200."""


SELECTIVE_SINCE = "3ab3fcb"
"""The commit from which selective checkpointing runs as the recipe runs it now (closed-form norm and MLP tail
instead of recomputed regions): selective plans measured before it timed another implementation."""


def _measured_before(commit: str, change: str) -> bool:
    """Whether ``commit`` comes before ``change`` in the history (git; a full clone is needed)."""
    import subprocess

    if change.startswith(commit) or commit.startswith(change):
        return False
    try:
        run = subprocess.run(["git", "merge-base", "--is-ancestor", commit, change], cwd=ROOT, capture_output=True)
    except FileNotFoundError:
        sys.exit("bench/step_time.py needs git to tell which measurements came before a change of the recipe")
    if run.returncode not in (0, 1):
        sys.exit(f"git cannot order {commit[:7]} and {change}: {run.stderr.decode().strip()} (a full clone is needed)")
    return run.returncode == 0


def winners(paths: list[Path], cal: Calibration) -> dict:
    """Whether the fitted model names the fastest measured plan of each case (the plans of one case share their
    global batch: the one with the most tokens per second wins), and how the plan it names measured against the
    fastest (``pick_over_best``; ``within_0_2_percent``: cases where the two measured within 0.2 %, below the
    noise of a measurement). The cases were measured with the probe of their commit and are in no fit; the cases
    under a smaller card's cap are left out (their plans ran at the H200's speed with the small card's attention
    kernels, which the trace for the H200 does not choose). Selective plans measured before ``SELECTIVE_SINCE``
    timed an implementation the recipe no longer runs: the figures are given without them and, under
    ``with_left_out``, with them."""
    plans, left_out = [], []
    for path in paths:
        if not path.is_file():
            continue
        for case in json.loads(path.read_text())["cases"]:
            if case["emulated"]:
                continue
            spec = resolve_model(case.get("model") or _model_of(path, case["name"]))
            gpu = resolve_gpu(case["gpu"])
            stale = _measured_before(case["commit"], SELECTIVE_SINCE)
            for r in case["measured"]:
                if not (r.get("measured_step_time_s") and r.get("measured_tokens_per_s")):
                    continue
                plan = Plan.from_dict(r["plan"])
                trace = cached_trace(spec, plan, fast_depth(spec), sdpa_backend(spec, plan, gpu))
                tokens = r["measured_tokens_per_s"] * r["measured_step_time_s"]
                plans.append({"source": path.name, "case": case["name"], "label": r["label"],
                              "stale": stale and plan.checkpointing == "selective",
                              "measured_tokens_per_s": r["measured_tokens_per_s"],
                              "estimated_tokens_per_s": tokens / step_time(spec, plan, gpu, trace, cal).step_s})
                if plans[-1]["stale"]:
                    left_out.append({"case": case["name"], "label": r["label"], "measured_at": case["commit"][:7],
                                     "error": plans[-1]["measured_tokens_per_s"] / plans[-1]["estimated_tokens_per_s"]
                                     - 1})

    def judged(rows: list[dict]) -> dict:
        cases = []
        for source, name in dict.fromkeys((p["source"], p["case"]) for p in rows):
            mine = [p for p in rows if (p["source"], p["case"]) == (source, name)]
            if len(mine) < 2:
                continue
            best = max(mine, key=lambda p: p["measured_tokens_per_s"])
            pick = max(mine, key=lambda p: p["estimated_tokens_per_s"])
            ratio = pick["measured_tokens_per_s"] / best["measured_tokens_per_s"]
            cases.append({"source": source, "case": name, "plans": len(mine), "fastest": best["label"],
                          "model_picks": pick["label"], "right": ratio == 1.0, "pick_over_best": ratio})
        return {"cases": len(cases), "right": sum(c["right"] for c in cases),
                "within_0_2_percent": sum(c["pick_over_best"] >= 0.998 for c in cases),
                "min_pick_over_best": min((c["pick_over_best"] for c in cases), default=None), "rows": cases}

    if not plans:
        return {}
    every = judged(plans)
    return {**judged([p for p in plans if not p["stale"]]), "left_out": left_out,
            "with_left_out": {k: v for k, v in every.items() if k != "rows"} | {
                "misses": [c for c in every["rows"] if not c["right"]]}}


def _model_of(path: Path, name: str) -> str:
    """The model of a measured case, from the plans file beside it."""
    plans = path.with_name(path.stem + "-plans.json")
    return next(c["model"] for c in json.loads(plans.read_text())["cases"] if c["name"] == name)


def summary(errs: list[float]) -> dict | None:
    a = [abs(e) for e in errs]
    return {"median_abs_err": statistics.median(a), "max_abs_err": max(a), "n": len(a)} if a else None


OOS = {"oos": "the first set, predicted with the calibration fitted on the older grid files",
       "oos-2": "the second set, predicted with the calibration fitted on grid-median.jsonl",
       "oos-3": "the third set, predicted with the calibration fitted on grid-probe2.jsonl and its first repeat "
                "(plans 0-104), measured twice",
       "oos-4": "the fourth set (mostly LLM.int8), predicted once LLM.int8's kept input and outlier columns were "
                "modelled, with the calibration fitted on grid-probe2.jsonl and its repeats"}
"""The out-of-sample sets of ``bench/timing.py`` (``--set``): ``timing/<set>-predicted.json`` holds what a commit
estimated before the plans were measured into ``timing/<set>.jsonl`` (and ``<set>-repeat.jsonl``: the step is the
median of a plan's measurements)."""


def _oos_paths(name: str) -> tuple[Path, Path]:
    return ROOT / f"bench/results/timing/{name}-predicted.json", ROOT / f"bench/results/timing/{name}.jsonl"


def _oos_repeat(name: str) -> Path:
    return ROOT / f"bench/results/timing/{name}-repeat.jsonl"


def predict_out_of_sample(name: str) -> None:
    """Estimate the step time of an out-of-sample set of ``bench/timing.py`` with the shipped calibration, before
    the plans are measured (``bench/timing.py grid OUT --set NAME``): the predictions are what this commit said."""
    from provenance import commit
    from timing import GRIDS

    predicted, measured = _oos_paths(name)
    if measured.exists():
        sys.exit(f"{measured} exists: these plans were measured, their predictions are already fixed")
    gpu, rows = resolve_gpu(GPU), []
    for i, (model, plan) in enumerate(GRIDS[name]):
        spec = resolve_model(model)
        trace = cached_trace(spec, plan, fast_depth(spec), sdpa_backend(spec, plan, gpu))
        rows.append({"index": i, "model": model, "plan": plan.to_dict(),
                     "estimated": step_time(spec, plan, gpu, trace).to_json()})
    predicted.write_text(json.dumps({"commit": commit(), "gpu": GPU, "rows": rows}, indent=1) + "\n")
    print(f"{len(rows)} predictions in {predicted.relative_to(ROOT)}")


def out_of_sample(name: str) -> dict | None:
    """The predictions of ``predict_out_of_sample`` against the measured steps, where both exist."""
    predicted_path, measured_path = _oos_paths(name)
    if not (predicted_path.exists() and measured_path.exists()):
        return None
    predicted = json.loads(predicted_path.read_text())
    measured = {r["index"]: r for r in load_rows([measured_path, _oos_repeat(name)])}
    rows = [{"index": p["index"], "model": p["model"], "plan": p["plan"],
             "measured_step_s": measured[p["index"]]["step_time_s"],
             "measurements": measured[p["index"]]["measurements"], "estimated_step_s": p["estimated"]["step_s"],
             "error": p["estimated"]["step_s"] / measured[p["index"]]["step_time_s"] - 1}
            for p in predicted["rows"] if p["index"] in measured]
    if not rows:
        return None
    by_class = {cls: summary([r["error"] for r in rows if error_class(Plan.from_dict(r["plan"])) == cls])
                for cls in ("kbit", "other")}
    return {"set": OOS[name], "predicted_at": predicted["commit"],
            "note": "the predictions of that commit, before these plans were measured; never fitted on",
            **summary([r["error"] for r in rows]), "by_class": by_class, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", nargs="+", type=Path, default=[GRID_FILE, *REPEATS],
                    help="measured steps (a plan in several files: the median of its measurements)")
    ap.add_argument("--kernels", type=Path, default=ROOT / "bench/results/timing/kernels.json")
    ap.add_argument("--kernels-2", type=Path, default=ROOT / "bench/results/timing/kernels-2.json")
    ap.add_argument("--kernels-kbit", type=Path, nargs="+",
                    default=[ROOT / "bench/results/timing/kernels-kbit.json",
                             ROOT / "bench/results/timing/kernels-kbit-2.json"],
                    help="profiled k-bit layers (their rows together)")
    ap.add_argument("--gaps", type=Path, default=ROOT / "bench/results/timing/gaps-2.json",
                    help="profiled LLM.int8 steps: the kernels of its outlier products")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/step_time.json")
    ap.add_argument("--write-calibration", action="store_true")
    ap.add_argument("--architectures", type=Path, default=ROOT / "bench/results/architectures.json",
                    help="steps of models outside the grid (bench/regret.py measure), checked against the fit")
    ap.add_argument("--predict", choices=sorted(OOS),
                    help="only estimate an out-of-sample set of bench/timing.py, before measuring it")
    args = ap.parse_args()
    if args.predict:
        return predict_out_of_sample(args.predict)
    gpu = resolve_gpu(GPU)
    kernel_fit = fit_kernels(json.loads(args.kernels.read_text()), gpu,
                             json.loads(args.kernels_2.read_text()) if args.kernels_2.is_file() else None)
    kbit_layers = {"rows": [r for path in args.kernels_kbit for r in json.loads(path.read_text())["rows"]]}
    kbit_fit, kbit_quality = fit_kbit_kernels(kbit_layers, gpu)
    kernel_fit.update(kbit_fit)
    unaligned_fit, unaligned_quality = fit_unaligned_matmuls(json.loads(args.gaps.read_text()),
                                                             kernel_fit["mm_t0"], gpu)
    kernel_fit.update(unaligned_fit)
    rows = load_rows(args.grid)
    cases, untraceable = [], []
    for r in rows:
        try:
            cases.append((r, traced(r)))
        except InvalidPlanError as e:  # e.g. an attention kernel this transformers refuses for the architecture
            untraceable.append({"model": r["model"], "plan": r["plan"], "reason": str(e)[:200]})
    fitting = [c for c in cases if c[0]["index"] % 2 == 0]
    heldout = [c for c in cases if c[0]["index"] % 2 == 1]
    cal = fit_steps(fitting, Calibration(**kernel_fit))
    fit_errs, held_errs = errors(fitting, cal), errors(heldout, cal)
    # The other fold: constants fitted on the odd plans, reported on the even ones (every plan held out once).
    other = fit_steps(heldout, Calibration(**kernel_fit))
    crossfold = held_errs + errors(fitting, other)
    closed = [step_cost(spec, plan, gpu).step_time_s / row["step_time_s"] - 1 for row, (spec, plan, gpu, _) in heldout]
    detail = []
    for (row, (spec, plan, g, trace)), part in [(c, "fit") for c in fitting] + [(c, "heldout") for c in heldout]:
        t = step_time(spec, plan, g, trace, cal)
        detail.append({"index": row["index"], "part": part, "model": row["model"], "plan": row["plan"],
                       "measured_step_s": row["step_time_s"], "measurements": row["measurements"],
                       "estimated": t.to_json(),
                       "error": t.step_s / row["step_time_s"] - 1,
                       "closed_form_step_s": step_cost(spec, plan, g).step_time_s})
    result = {
        "gpu": GPU, "command": "python bench/step_time.py --write-calibration",
        "measured_with": "python bench/timing.py kernels / kernels-2 / kernels-kbit / grid on one H200 "
                         "(bench/results/timing/)",
        "constants": cal.to_json(), "kernel_fit": kernel_fit, "kbit_kernel_fit": kbit_quality,
        "unaligned_matmul_fit": unaligned_quality,
        "fit": summary(fit_errs), "heldout": summary(held_errs),
        "heldout_both_folds": summary(crossfold),
        "constants_other_fold": other.to_json(),
        "heldout_by_class": {cls: summary([e for e, (row, (spec, plan, g, tr)) in zip(held_errs, heldout)
                                           if error_class(plan) == cls]) for cls in ("kbit", "other")},
        "heldout_closed_form": summary(closed),
        "out_of_sample": {name: out_of_sample(name) for name in OOS},
        "reproducibility": reproducibility(args.grid[0], args.grid[1:]),
        "architectures": sorted({r["model"] for r, _ in heldout}),
        "other_architectures": other_architectures(args.architectures, cal) if args.architectures.is_file() else None,
        "winners": winners(WINNER_CASES, cal),
        "not_traced_here": untraceable,
        "rows": detail,
    }
    result["host_per_layer_s"] = host_layers(cal)
    result["int8_call_host"] = int8_call_host(kbit_layers, cal)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.write_calibration:
        path = ROOT / "profiles/calibration" / f"{GPU}.json"
        data = json.loads(path.read_text())
        data["step_time"] = {"measured_with": result["measured_with"], "fitted_by": result["command"],
                             "heldout": result["heldout"], "heldout_by_class": result["heldout_by_class"],
                             "constants": cal.to_json(),
                             "host_per_layer_s": result["host_per_layer_s"]}
        path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"fit on {len(fitting)}: median {result['fit']['median_abs_err']:.1%} max {result['fit']['max_abs_err']:.1%}")
    print(f"held out {len(heldout)}: median {result['heldout']['median_abs_err']:.1%} "
          f"max {result['heldout']['max_abs_err']:.1%} (closed form: median "
          f"{result['heldout_closed_form']['median_abs_err']:.1%}, max {result['heldout_closed_form']['max_abs_err']:.1%})")
    won = result["winners"]
    if won:
        print(f"winners: the model names the fastest measured plan in {won['right']} of {won['cases']} cases "
              f"(its pick at worst {won['min_pick_over_best']:.3f} of the fastest; with the selective plans measured "
              f"before {SELECTIVE_SINCE}: {won['with_left_out']['right']} of {won['with_left_out']['cases']}, "
              f"{won['with_left_out']['min_pick_over_best']:.3f})")
    both = result["heldout_both_folds"]
    print(f"both folds, {both['n']} held out: median {both['median_abs_err']:.1%} max {both['max_abs_err']:.1%}")
    for d in sorted(detail, key=lambda d: -abs(d["error"]))[:8]:
        p = d["plan"]
        print(f"  {d['part']:7} {d['model']:17} {p['peft']:4} {p['quantization']:4} {p['checkpointing']:9} "
              f"{p['optimizer']:11} {p['batch_size']}x{p['seq_len']}  measured {d['measured_step_s']:.3f} "
              f"est {d['estimated']['step_s']:.3f} ({d['error']:+.1%})")


if __name__ == "__main__":
    main()
