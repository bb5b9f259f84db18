"""The supervisor of a run: checks the input, keeps ``run.json``, runs one attempt per plan, falls back to the
next plan after an out-of-memory error, and writes the report.

One process runs in this one (no process group); several run under ``torchrun`` (``torch.distributed.run``), one
process per GPU (gloo processes on a machine without CUDA), ``--nnodes/--node-rank/--rdzv-endpoint`` passed
through. With several nodes, the output folder must be on a file system every node sees (the checkpoint is
sharded over all ranks); node 0 keeps ``run.json`` and the report.

``run.json``::

    model, gpu, plan (the plan in effect), fallbacks, run (RunConfig), world_size, device,
    estimate (memtune's estimate of the plan in effect), status (running|finished|failed|interrupted),
    plans_tried [{plan, outcome (finished|oom|interrupted|failed), at_step}], started, finished, command
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import signal
import subprocess
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from memtune.errors import ConfigError, MemtuneError
from memtune.plan import Plan, summarize
from memtune.planfile import PlanFile, read_table_file
from memtune.records import SCHEMA_VERSION
from memtune.runconfig import RunConfig
from memtune.train import distributed
from memtune.train.distributed import Torchrun
from memtune.train.loop import STOP_FILE, Job, Outcome

RUN_JSON = "run.json"
ERROR_LOG = "error.log"


@dataclass(frozen=True, kw_only=True, slots=True)
class RunResult:
    output_dir: Path
    status: str
    record: dict
    message: str = ""


def torchrun_command(job_path: Path, plan: Plan, torchrun: Torchrun = Torchrun()) -> list[str]:
    """The torchrun command line of one attempt: ``plan.num_gpus`` processes on this node, running
    ``memtune.launch.worker JOB``."""
    return distributed.torchrun_command("memtune.launch.worker", [str(job_path)], plan.num_gpus, torchrun)


def launch_command(plan_path: Path, output_dir: Path, *, max_steps: int | None = None,
                   torchrun: Torchrun = Torchrun(), fallback: bool = True) -> list[str]:
    """The ``memtune launch`` command line that runs (or resumes) this run."""
    cmd = ["memtune", "launch", str(plan_path), "--output-dir", str(output_dir)]
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    if torchrun.nnodes > 1 or torchrun.rdzv_endpoint:
        cmd += ["--nnodes", str(torchrun.nnodes), "--node-rank", str(torchrun.node_rank)]
        cmd += ["--rdzv-endpoint", torchrun.rdzv_endpoint] if torchrun.rdzv_endpoint else []
    return cmd + ([] if fallback else ["--no-fallback"])


@dataclass(frozen=True, kw_only=True)
class _Prepared:
    plan_file: PlanFile
    run: RunConfig
    spec: object
    gpu: object
    plans: tuple[Plan, ...]
    tokenizer: str
    output_dir: Path


def _prepare(plan_file: PlanFile, base_dir: Path, output_dir: str | Path | None, max_steps: int | None,
             fallback: bool, torchrun: Torchrun) -> _Prepared:
    """Every check of the input that can fail before a GPU is touched (each a ConfigError with what to do)."""
    from memtune.specs import resolve_gpu, resolve_model
    from memtune.specs.model import find_config
    from memtune.train import data as train_data

    if plan_file.run is None:
        raise ConfigError("the plan file has no [run] table; add one with at least dataset = PATH "
                          "(see profiles/runs/tiny-cpu.toml)")
    run = plan_file.run.resolved(base_dir)
    if max_steps is not None:
        run = dataclasses.replace(run, max_steps=max_steps)
    local = base_dir / plan_file.model
    model = str(local) if local.exists() else plan_file.model
    spec = resolve_model(model)
    gpu = resolve_gpu(plan_file.gpu)
    plans = (plan_file.plan, *plan_file.fallbacks) if fallback and run.on_oom == "fallback" else (plan_file.plan,)
    for plan in plans:
        plan.check_model(spec)
        if plan.nodes != torchrun.nnodes:
            raise ConfigError(f"the plan is for {plan.nodes} node(s) and this launch for {torchrun.nnodes}: pass "
                              f"--nnodes {plan.nodes} (with --node-rank and --rdzv-endpoint) on every node")
    if not run.random_init and spec.weights_dir is None:
        raise ConfigError(f"{model} has no weights here (no *.safetensors next to its config.json): point model at a "
                          "model folder or a cached Hub id with weights, or set random_init = true in [run]")
    tokenizer = run.tokenizer or str(find_config(model).parent)
    train_data.load_tokenizer(tokenizer, vocab_size=spec.vocab_size)
    train_data.check_columns(run)
    out = output_dir or run.output_dir
    if out is None:
        raise ConfigError("pass --output-dir DIR (or set output_dir in [run])")
    return _Prepared(plan_file=plan_file, run=run, spec=spec, gpu=gpu, plans=plans, tokenizer=tokenizer,
                     output_dir=Path(out).expanduser().resolve())


def launch(plan_file: PlanFile, *, base_dir: str | Path = ".", output_dir: str | Path | None = None,
           max_steps: int | None = None, torchrun: Torchrun = Torchrun(), fallback: bool = True,
           command: list[str] | None = None, console: Console | None = None,
           override: Sequence[str] = ()) -> RunResult:
    """Run (or resume) the fine-tune of ``plan_file`` into ``output_dir``.

    Relative paths of the plan file (model folder, dataset, tokenizer) are taken from ``base_dir``. A folder that
    holds an unfinished run of the same model is resumed from its newest checkpoint; the plans that ran out of memory
    there are skipped. A resume with other settings is refused, except those named in ``override`` (run settings by
    name, plan fields as ``FIELD`` or ``plan.FIELD``), whose new values are taken and recorded in run.json's
    ``overrides``.

    Raises:
        ConfigError: bad input (missing [run], dataset, fields, weights, a finished run in the folder...).
    """
    import torch

    console = console or Console(highlight=False)
    prep = _prepare(plan_file, Path(base_dir), output_dir, max_steps, fallback, torchrun)
    out = prep.output_dir
    out.mkdir(parents=True, exist_ok=True)
    writer = torchrun.node_rank == 0
    record = _start_record(prep, out, command, torch, frozenset(override))
    tried_oom = {Plan.from_dict(t["plan"]) for t in record["plans_tried"] if t["outcome"] == "oom"}
    queue = [(i, p) for i, p in enumerate(prep.plans) if p not in tried_oom]
    if not queue:
        raise ConfigError(f"every plan of this run ran out of memory before (see {out / RUN_JSON}); add a "
                          "[[fallback]] that needs less memory")
    outcome = Outcome(status="failed", at_step=0)
    for n, (index, plan) in enumerate(queue):
        record.update(plan=plan.to_dict(), world_size=plan.world_size, estimate=_estimate(prep, plan),
                      device=_device_name(torch, plan))
        if writer:
            _write_record(out, record)
        console.print(f"[bold]launch[/] {escape(prep.spec.name)}: {escape(summarize(plan))} on "
                      f"{escape(record['device'])} -> {escape(str(out))}")
        job = Job(model_name=prep.spec.name, model_config=prep.spec.config_json, weights_dir=prep.spec.weights_dir,
                  tokenizer=prep.tokenizer, plan=plan, run=prep.run, output_dir=str(out), attempt=index)
        try:
            outcome = _run_job(job, torchrun, console)
        except (MemtuneError, KeyboardInterrupt) as e:  # bad input found late, or a second Ctrl-C
            stopped = isinstance(e, KeyboardInterrupt)
            record["plans_tried"].append({"plan": plan.to_dict(), "outcome": "interrupted" if stopped else "failed",
                                          "at_step": _last_step(out)})
            _end(record, out, "interrupted" if stopped else "failed", writer, console,
                 error=None if stopped else str(e))
            raise
        except Exception as e:  # noqa: BLE001 - the run ends as failed, with the traceback kept for the user
            (out / ERROR_LOG).write_text(traceback.format_exc())
            outcome = Outcome(status="failed", at_step=_last_step(out),
                              message=f"{type(e).__name__}: {e} (traceback in {out / ERROR_LOG})")
        record["plans_tried"].append({"plan": plan.to_dict(), "outcome": outcome.status, "at_step": outcome.at_step})
        if outcome.status == "oom" and n + 1 < len(queue):
            resume = outcome.saved_step if outcome.saved_step is not None else _latest_step(out)
            console.print(f"[bold red]out of memory[/] at step {outcome.at_step} with {escape(summarize(plan))}: "
                          f"{escape(outcome.message)}")
            console.print(f"restarting from the checkpoint of step {resume} with the next plan: "
                          f"{escape(summarize(queue[n + 1][1]))}" if resume is not None else
                          f"no checkpoint yet: restarting from step 0 with the next plan: "
                          f"{escape(summarize(queue[n + 1][1]))}")
            continue
        break
    status = {"finished": "finished", "interrupted": "interrupted"}.get(outcome.status, "failed")
    message = outcome.message
    if outcome.status == "oom":
        message = (f"out of memory at step {outcome.at_step} with the last plan ({outcome.message}); the newest "
                   f"checkpoint is kept: add a [[fallback]] that needs less memory and run the same command")
    _end(record, out, status, writer, console, error=message if status == "failed" else None)
    return RunResult(output_dir=out, status=status, record=record, message=message)


def _start_record(prep: _Prepared, out: Path, command: list[str] | None, torch,
                  override: frozenset[str] = frozenset()) -> dict:
    path = out / RUN_JSON
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    base = {"schema": SCHEMA_VERSION, "model": prep.plan_file.model, "model_path": prep.spec.name,
            "gpu": prep.gpu.name,
            "plan": prep.plans[0].to_dict(),
            "fallbacks": [p.to_dict() for p in prep.plans[1:]], "run": prep.run.to_dict(),
            "world_size": prep.plans[0].world_size, "device": _device_name(torch, prep.plans[0]), "estimate": None,
            "status": "running", "plans_tried": [], "started": now, "finished": None,
            "command": shlex.join(command or []), "identity": _identity(prep)}
    if not path.exists():
        return base
    try:
        old = read_table_file(path, "run record")
    except ConfigError as e:
        raise ConfigError(f"{e}; pass another --output-dir") from None
    if old.get("status") == "finished":
        raise ConfigError(f"{out} holds a finished run; pass another --output-dir")
    from memtune.planner.measured import same_model

    if not (old.get("model") == prep.plan_file.model or same_model(old.get("model_path"), prep.spec.name)):
        raise ConfigError(f"{out} holds a run of {old.get('model')}, not {prep.plan_file.model}; pass another "
                          "--output-dir")
    changed = _changed(old.get("identity"), base["identity"])
    refused = {k: v for k, v in changed.items() if k not in override and k.removeprefix("plan.") not in override}
    if refused:
        raise ConfigError(f"{out} holds a run with other settings ({'; '.join(f'{k}: {v}' for k, v in refused.items())}"
                          f"): resuming would mix them; run with the settings it was started with, pass another "
                          f"--output-dir, or take the new ones with --override {','.join(refused)}")
    overrides = old.get("overrides", []) + ([{"at": now, "changed": changed}] if changed else [])
    return {**base, "plans_tried": old.get("plans_tried", []), "started": old.get("started", now),
            "overrides": overrides}


def _identity(prep: _Prepared) -> dict:
    """What decides a run's numbers beside its model: every plan it may use, in order, and its run settings (the
    output folder aside). A resume must find the same."""
    run = {k: v for k, v in prep.run.to_dict().items() if k != "output_dir"}
    return {"plans": [p.to_dict() for p in prep.plans], "run": run}


def _changed(old: dict | None, new: dict) -> dict[str, str]:
    """The settings that differ between a run's recorded identity and a new one, ``{key: "old -> new"}``: run
    settings by name, plan fields as ``plan.FIELD`` (``plan.fallbacks`` for their number); none for a record
    without an identity."""
    if not isinstance(old, dict):
        return {}
    changed = {key: f"{old.get('run', {}).get(key)!r} -> {new['run'].get(key)!r}"
               for key in sorted(set(old.get("run", {})) | set(new["run"]))
               if old.get("run", {}).get(key) != new["run"].get(key)}
    before, after = old.get("plans", []), new["plans"]
    for key in sorted({k for a, b in zip(before, after) for k in set(a) | set(b) if a.get(k) != b.get(k)}):
        changed[f"plan.{key}"] = " / ".join(f"{a.get(key)!r} -> {b.get(key)!r}" for a, b in zip(before, after)
                                             if a.get(key) != b.get(key))
    if len(before) != len(after):
        changed["plan.fallbacks"] = f"{len(before) - 1} -> {len(after) - 1}"
    return changed


def _end(record: dict, out: Path, status: str, writer: bool, console: Console, *, error: str | None = None) -> None:
    record.update(status=status, finished=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    if error:
        record["error"] = error
    else:
        record.pop("error", None)
    if not writer:
        return
    _write_record(out, record)
    write_report(out, console)


def write_report(out: Path, console: Console) -> Path | None:
    """``report.html`` of the run folder; a failure to render it is a note, never the run's failure."""
    from memtune.reporting import write_report as render

    try:
        return render(out, out / "report.html")
    except Exception as e:  # noqa: BLE001 - the run's results are on disk; a report failure must not hide them
        console.print(f"report not written ({type(e).__name__}: {escape(str(e))}); the run's files are in "
                      f"{escape(str(out))}")
        return None


def _write_record(out: Path, record: dict) -> None:
    tmp = out / f".{RUN_JSON}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out / RUN_JSON)


def _estimate(prep: _Prepared, plan: Plan) -> dict | None:
    from memtune.errors import MemtuneError
    from memtune.estimate import estimate

    try:
        return estimate(prep.spec, plan, prep.gpu).to_json()
    except MemtuneError:
        return None


def _device_name(torch, plan: Plan) -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return name if plan.world_size == 1 else f"{plan.world_size} x {name}"
    return "cpu" if plan.world_size == 1 else f"cpu ({plan.world_size} gloo processes)"


def _latest_step(out: Path) -> int | None:
    from memtune.train.checkpoint import latest_checkpoint

    saved = latest_checkpoint(out)
    return saved.step if saved else None


def _last_step(out: Path) -> int:
    from memtune.records import metric_rows

    return max((row["step"] for _, row in metric_rows(out / "metrics.jsonl")), default=0)


def _run_job(job: Job, torchrun: Torchrun, console: Console) -> Outcome:
    (Path(job.output_dir) / STOP_FILE).unlink(missing_ok=True)
    if job.plan.world_size == 1 and job.plan.sharding == "none":  # FSDP2 needs a process group, even of one
        import torch

        from memtune.train.loop import run_attempt

        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return run_attempt(job, device=device)
    return _run_torchrun(job, torchrun, console)


def _run_torchrun(job: Job, torchrun: Torchrun, console: Console) -> Outcome:
    import torch

    out = Path(job.output_dir)
    if torch.cuda.is_available() and job.plan.num_gpus > torch.cuda.device_count():
        raise ConfigError(f"the plan needs {job.plan.num_gpus} GPUs per node and {torch.cuda.device_count()} are "
                          "visible")
    for stale in out.glob(".outcome-rank*.json"):
        stale.unlink()
    job_path = out / "job.json"
    job_path.write_text(json.dumps(job.to_json(), indent=2))
    # torchrun runs in its own session: a Ctrl-C reaches only this process, which asks the ranks (through the stop
    # file) to save and stop together; a second one stops them at once.
    proc = subprocess.Popen(torchrun_command(job_path, job.plan, torchrun), start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **job.plan.allocator_env})
    requests = []

    def stop(signum, frame):
        requests.append(signum)
        if len(requests) == 1:
            (out / STOP_FILE).touch()
            console.print(f"{signal.Signals(signum).name}: the ranks save a checkpoint after this step "
                          "(Ctrl-C again to stop now)")
        else:
            os.killpg(proc.pid, signal.SIGTERM)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        (out / STOP_FILE).unlink(missing_ok=True)
    outcomes = {int(p.stem.removeprefix(".outcome-rank")): Outcome(**json.loads(p.read_text()))
                for p in out.glob(".outcome-rank*.json")}
    oom = [o for o in outcomes.values() if o.status == "oom"]
    if oom:
        return Outcome(status="oom", at_step=min(o.at_step for o in oom), message=oom[0].message)
    if 0 in outcomes:
        ended = outcomes[0]
        return ended if ended.status != "failed" else dataclasses.replace(ended, at_step=_last_step(out))
    if len(requests) > 1:
        return Outcome(status="interrupted", at_step=_last_step(out), message="stopped without a checkpoint")
    return Outcome(status="failed", at_step=_last_step(out), message=f"torchrun exited with code {code} and no rank "
                   "reported an outcome (see the output above)")
