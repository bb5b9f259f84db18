"""``validate``: a few instrumented steps of the real training code, compared with the estimate.

Three ways to run, each cheaper than launching the fine-tune:

* on the local GPU(s): ``measure_plan`` in this process, or under ``torchrun`` (one process per GPU, NCCL) for
  FSDP plans, each rank writing its measurement;
* with ``emulate`` (a smaller GPU's profile): PyTorch's pool is capped at that card's memory less the CUDA
  context, so an OOM means "does not fit there";
* ``dry_run`` (automatic without CUDA): the same step on fake tensors on the CPU with a fake process group of the
  plan's world size (the estimator's trace) - it checks that the plan builds and runs for N ranks, and shows the
  memory the trace sees. No GPU memory is measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from memtune.errors import ConfigError, RunFailedError
from memtune.estimate import MemoryBreakdown, Phase, estimate, overhead, sdpa_backend
from memtune.estimate.categories import Verdict
from memtune.plan import Plan
from memtune.records import SCHEMA_VERSION, EstimatedTimeline, StepMeasurement, ValidationMode
from memtune.specs.gpu import GpuSpec
from memtune.specs.model import ModelSpec

TORCHRUN_TIMEOUT_S = 900
DEFAULT_TOLERANCE = 0.03
"""Largest |estimated / measured - 1| of peak allocated bytes that counts as agreement."""


@dataclass(frozen=True, kw_only=True)
class ValidationRecord:
    model: str
    gpu: str
    """The GPU the plan is for (the emulated one, under ``emulate``)."""
    mode: ValidationMode
    """``gpu``, ``emulated`` (capped on a larger GPU) or ``dry-run`` (fake tensors on the CPU)."""
    plan: Plan
    estimate: MemoryBreakdown
    ranks: tuple[StepMeasurement, ...]
    """One measurement per rank (``measure_plan``'s, given as records or as their mappings)."""
    tolerance: float
    device_name: str = ""
    memory_cap_bytes: int | None = None
    snapshot: str | None = None
    notes: list[str] = field(default_factory=list)
    estimated_timeline: EstimatedTimeline | None = None
    """The estimated step's memory over time (``memtune.estimate.timeline``), for the report."""

    def __post_init__(self):
        object.__setattr__(self, "ranks", tuple(r if isinstance(r, StepMeasurement) else StepMeasurement.from_json(r)
                                                for r in self.ranks))

    @property
    def oom(self) -> bool:
        return any(r.oom for r in self.ranks)

    @property
    def measured_peak_allocated_bytes(self) -> int | None:
        return self._largest("measured_peak_allocated_bytes")

    @property
    def measured_peak_reserved_bytes(self) -> int | None:
        return self._largest("measured_peak_reserved_bytes")

    def _largest(self, key: str) -> int | None:
        """The largest rank's value (FSDP ranks differ slightly), or None when a rank has none."""
        values = [getattr(r, key) for r in self.ranks]
        return max(values) if values and None not in values else None

    @property
    def error(self) -> float | None:
        """estimated / measured - 1 of peak allocated bytes (None for a dry run or an OOM)."""
        m = self.measured_peak_allocated_bytes
        if self.oom or m is None or self.mode == "dry-run":
            return None
        return self.estimate.peak_allocated_bytes / m - 1

    @property
    def verdict(self) -> str:
        if self.mode == "dry-run":
            return "dry run: the plan builds and runs; no GPU memory was measured"
        said = {Verdict.FITS: "the estimate said it fits", Verdict.BORDERLINE: "the estimate called it borderline",
                Verdict.DOES_NOT_FIT: "the estimate said it does not fit"}[self.estimate.verdict]
        if self.oom:
            high = self.measured_peak_reserved_bytes or 0
            return f"does not fit on {self.gpu}: out of memory at {high / 2**30:.2f} GiB reserved ({said})"
        ok = abs(self.error) <= self.tolerance
        fit = "fits" if self.estimate.fits else f"fits here ({said})"
        return (f"{fit} on {self.gpu}; estimate {'agrees' if ok else 'DISAGREES'}: "
                f"{100 * self.error:+.2f} % of peak allocated (tolerance {100 * self.tolerance:.0f} %)")

    @property
    def agrees(self) -> bool:
        if self.mode == "dry-run":
            return True
        if self.oom:
            return not self.estimate.fits
        fit_agrees = self.estimate.verdict != Verdict.DOES_NOT_FIT or self.mode != "emulated"
        return abs(self.error) <= self.tolerance and fit_agrees

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA_VERSION, "model": self.model, "gpu": self.gpu, "mode": str(self.mode),
            "device_name": self.device_name,
            "plan": self.plan.to_dict(), "tolerance": self.tolerance, "memory_cap_bytes": self.memory_cap_bytes,
            "verdict": self.verdict, "agrees": self.agrees, "oom": self.oom, "error": self.error,
            "estimated_peak_allocated_bytes": self.estimate.peak_allocated_bytes,
            "estimated_peak_reserved_bytes": self.estimate.peak_reserved_bytes,
            "measured_peak_allocated_bytes": self.measured_peak_allocated_bytes,
            "measured_peak_reserved_bytes": self.measured_peak_reserved_bytes,
            "estimate": self.estimate.to_json(), "ranks": [r.to_json() for r in self.ranks], "snapshot": self.snapshot,
            "notes": self.notes,
            "estimated_timeline": self.estimated_timeline.to_json() if self.estimated_timeline else None,
        }


def validate_plan(spec: ModelSpec, plan: Plan, gpu: GpuSpec, *, steps: int = 5, emulate: bool = False,
                  dry_run: bool | None = None, tolerance: float = DEFAULT_TOLERANCE, out_dir: Path | None = None,
                  snapshot: bool = False, random_init: bool = False) -> ValidationRecord:
    """Run ``steps`` measured steps of ``plan`` (after a warm-up step) and compare with the estimate for ``gpu``.

    ``emulate=True`` runs on the local (larger) GPU with its pool capped to ``gpu``'s memory less the CUDA context.
    ``dry_run=None`` means "dry run when there is no CUDA GPU". The model starts from ``spec.weights_dir`` when it
    has weights, unless ``random_init``.
    """
    import torch

    from memtune.estimate.timeline import estimated_timeline

    if out_dir is not None:  # before any work: a record that cannot be written is known now, not after the steps
        out_dir = _writable_folder(Path(out_dir))
    est = estimate(spec, plan, gpu)
    if dry_run is None:
        dry_run = not torch.cuda.is_available()
    if dry_run:
        record = _dry_run(spec, plan, gpu, est, tolerance)
        if emulate:
            record.notes.append(f"no CUDA GPU here: the {gpu.name} cap needs one, so this is a dry run")
        if out_dir is not None:
            (out_dir / "validation.json").write_text(json.dumps(record.to_json(), indent=2))
        return record
    if plan.nodes > 1:
        raise ConfigError("validate runs on one node; validate a multi-node plan with --nodes 1 and the same "
                          "--num-gpus, or use --dry-run")
    available = torch.cuda.device_count()
    if plan.num_gpus > available:
        raise ConfigError(f"the plan needs {plan.num_gpus} GPUs and {available} are visible; use --dry-run or "
                          f"run on a machine with {plan.num_gpus} GPUs")
    out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="memtune-validate-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    cap = gpu.memory_bytes - overhead.runtime_overhead_bytes(plan.has_process_group) if emulate else None
    # Under emulation, attention runs the kernel the emulated GPU would pick (e.g. no flash attention on a V100).
    backend = sdpa_backend(spec, plan, gpu) if emulate else None
    snapshot_path = out_dir / "snapshot.pickle" if snapshot else None
    run = plan.recipe_plan  # what memtune's recipe runs for another stack's plan
    if run.sharding == "none":
        from memtune.validate.probe import measure_plan

        ranks = [measure_plan(spec, run, steps=steps, memory_cap_bytes=cap, snapshot_path=snapshot_path,
                              sdpa_backend=backend, load_weights=not random_init)]
    else:
        ranks = _torchrun(spec, run, steps=steps, cap=cap, out_dir=out_dir, snapshot=snapshot, backend=backend,
                          weights_dir=None if random_init else spec.weights_dir)
    mode = ValidationMode.EMULATED if emulate else ValidationMode.GPU
    record = ValidationRecord(model=spec.name, gpu=gpu.name, mode=mode, plan=plan, estimate=est, ranks=ranks,
                              tolerance=tolerance, estimated_timeline=estimated_timeline(spec, plan, gpu),
                              device_name=torch.cuda.get_device_name(), memory_cap_bytes=cap,
                              snapshot=str(snapshot_path) if snapshot_path and snapshot_path.exists() else None)
    (out_dir / "validation.json").write_text(json.dumps(record.to_json(), indent=2))
    return record


def _writable_folder(path: Path) -> Path:
    """``path``, created if needed; ConfigError (one line) where it cannot be, or cannot be written to."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".memtune-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"--out {path} cannot be written ({e.strerror or e}): choose a folder you can write to") \
            from None
    return path


def _dry_run(spec, plan, gpu, est, tolerance) -> ValidationRecord:
    from memtune.estimate.compose import cached_trace
    from memtune.estimate.timeline import estimated_timeline

    trace = cached_trace(spec, plan, spec.num_layers, sdpa_backend(spec, plan, gpu))
    rank = {"device": "fake tensors on the CPU",
            "traced_phases": {p.value: trace.phase_peak(p) for p in Phase},
            "traced_peak_reserved_bytes": trace.peak_reserved,
            "world_size": plan.world_size}
    return ValidationRecord(model=spec.name, gpu=gpu.name, mode=ValidationMode.DRY_RUN, plan=plan, estimate=est,
                            ranks=[rank], tolerance=tolerance, device_name="cpu (fake tensors)",
                            estimated_timeline=estimated_timeline(spec, plan, gpu),
                            notes=[f"traced {plan.world_size} rank(s) with a fake process group"])


def _torchrun(spec: ModelSpec, plan: Plan, *, steps: int, cap: int | None, out_dir: Path, snapshot: bool,
              backend: str | None, weights_dir: str | None) -> list[dict]:
    job = out_dir / "job.json"
    job.write_text(json.dumps({"model_config": spec.config_json, "model_name": spec.name, "plan": plan.to_dict(),
                               "steps": steps, "memory_cap_bytes": cap, "snapshot": snapshot,
                               "sdpa_backend": backend, "weights_dir": weights_dir}))
    from memtune.train.distributed import torchrun_command

    cmd = torchrun_command("memtune.validate.worker", [str(job)], plan.num_gpus)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **plan.allocator_env})
    except subprocess.TimeoutExpired:
        raise RunFailedError(f"the {plan.num_gpus}-GPU validation did not finish in {TORCHRUN_TIMEOUT_S} s "
                          "(a rank may have run out of memory while the others waited)") from None
    ranks = []
    for r in range(plan.world_size):
        path = out_dir / f"rank{r}.json"
        if not path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RunFailedError(f"rank {r} wrote no result (torchrun exit {proc.returncode}): {' | '.join(tail)}")
        ranks.append(json.loads(path.read_text()))
    return ranks
