"""``tune``: plan -> validate the best candidates -> the plan file ``launch`` runs (the best that validated, the
others that validated as its fallbacks, in order).

The token lengths of the run's own data, in its format (the Llama Guard template included), set the padded sequence
length and the padding waste the planner's cost model uses. Candidates are validated in order of cost: real steps on
the local GPU (capped at the target GPU's memory when that is another one), or a dry run on fake tensors without a
GPU, where a candidate passes when its full estimate fits.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from memtune.errors import ConfigError
from memtune.launch.config import RunConfig
from memtune.planfile import PlanFile, read_table_file, write_plan_file

PLAN_FILE = "plan.toml"


@dataclass(frozen=True, kw_only=True, slots=True)
class RunFile:
    """A file with a ``[run]`` table, and optionally the model and GPU (a plan file is one)."""

    run: RunConfig
    model: str | None
    gpu: str | None
    folder: Path


def read_run_file(path: str | Path) -> RunFile:
    """Raises ConfigError for a missing or malformed file, or one without a ``[run]`` table."""
    path = Path(path)
    data = read_table_file(path, "run")
    if "run" not in data:
        raise ConfigError(f"{path} has no [run] table; add one with at least dataset = PATH")
    folder = path.resolve().parent
    model = data.get("model")
    if model and (folder / model).exists():
        model = str(folder / model)
    return RunFile(run=RunConfig.from_dict(data["run"]).resolved(folder), model=model, gpu=data.get("gpu"),
                   folder=folder)


def data_lengths(run: RunConfig, tokenizer_path: str, *, vocab_size: int, max_len: int):
    """Token lengths of the training samples in the run's format (``LengthStats``)."""
    from memtune.data import LengthStats
    from memtune.train import data as train_data

    tokenizer = train_data.load_tokenizer(tokenizer_path, vocab_size=vocab_size)
    samples = train_data.tokenize(train_data.read_dataset(run.dataset), run, tokenizer, seq_len=max_len)
    return LengthStats(lengths=tuple(sorted(samples.lengths)), source=run.dataset)


def tune(*, model: str, gpu: str, run: RunConfig, output_dir: Path, num_gpus: int = 1, nodes: int = 1,
         batch_size: int = 1, seq_len: int | None = None, batching: str = "padding", global_batch: int | None = None,
         fixed: dict | None = None, candidates: int = 3, validate_steps: int = 3,
         console: Console | None = None) -> PlanFile:
    """Plan the run, validate up to ``candidates`` plans that fit (cheapest first) and write ``output_dir/plan.toml``
    with the best that validated and the others as fallbacks; ``plan.json`` (the planner's result) and
    ``validation.json`` (the chosen plan's validation) go next to it for the report.

    Raises:
        ConfigError: bad input, or no candidate fits or validates.
    """
    import torch

    from memtune.plan import Plan
    from memtune.planner import plan_candidates
    from memtune.specs import resolve_gpu, resolve_model
    from memtune.specs.model import _find_config
    from memtune.validate.run import validate_plan

    console = console or Console(highlight=False)
    spec, gpu_spec = resolve_model(model), resolve_gpu(gpu)
    if fixed:
        Plan(**fixed)  # a bad value is bad input, not a candidate that fails
    tokenizer = run.tokenizer or str(_find_config(model).parent)
    context = spec.max_position_embeddings or 1 << 20
    lengths = data_lengths(run, tokenizer, vocab_size=spec.vocab_size, max_len=1 << 30)
    data = lengths.to_json()
    if seq_len is None:
        seq_len = min(lengths.max, context) if batching == "padding" else min(2048, context)
    if batching == "padding":
        data["padding_efficiency"] = lengths.padded(batch_size)[1]
    console.print(f"[bold]tune[/] {escape(spec.name)} on {escape(gpu_spec.name)}: {lengths.count} samples, "
                  f"p50 {lengths.quantile(0.5)}, max {lengths.max} tokens; seq_len {seq_len}")
    result = plan_candidates(spec, gpu_spec, num_gpus=num_gpus, nodes=nodes, batch_size=batch_size, seq_len=seq_len,
                             batching=batching, data=data, fixed=fixed, global_batch=global_batch,
                             lengths=lengths if batching == "padding" else None)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "plan.json").write_text(json.dumps(result.to_json(), indent=2))
    fitting = sorted((c for c in result.candidates if c.fits and c is not result.chosen),
                     key=lambda c: (c.cost.gpu_seconds_per_token, -c.breakdown.headroom_bytes))
    order = ([result.chosen] if result.chosen else []) + fitting
    if not order:
        raise ConfigError(f"no candidate fits on {gpu_spec.name}; see `memtune plan` for the closest miss, or add "
                          "GPUs (--num-gpus)")
    local = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    emulate = local is not None and not _same_gpu(local, gpu_spec)
    validated = []
    for i, candidate in enumerate(order[:candidates]):
        record = validate_plan(spec, candidate.plan, gpu_spec, steps=validate_steps, emulate=emulate,
                               out_dir=output_dir / "validation" / str(i), random_init=run.random_init)
        ok = not record.oom and (record.mode != "dry-run" or record.estimate.verdict != "does not fit")
        console.print(f"  {'[green]ok[/]' if ok else '[red]no[/]'}  {escape(candidate.label)}: "
                      f"{escape(record.verdict)}")
        if ok:
            if not validated:
                (output_dir / "validation.json").write_text(json.dumps(record.to_json(), indent=2))
            validated.append(candidate.plan)
    if not validated:
        raise ConfigError(f"none of the {min(candidates, len(order))} cheapest plans validated on "
                          f"{gpu_spec.name}; see {output_dir / 'validation'}")
    plan_file = PlanFile(model=model, gpu=gpu_spec.name, plan=validated[0], fallbacks=tuple(validated[1:]),
                         run=dataclasses.replace(run, output_dir=str(output_dir)))
    write_plan_file(output_dir / PLAN_FILE, plan_file)
    return plan_file


def _same_gpu(device_name: str, gpu) -> bool:
    from memtune.errors import UnknownGpuError
    from memtune.specs import resolve_gpu

    try:
        return resolve_gpu(device_name).name == gpu.name
    except UnknownGpuError:
        return False
