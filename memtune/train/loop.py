"""One attempt of a run in one process (one rank): setup -> train -> cleanup.

The step is ``memtune.train.recipe``'s (the code ``validate`` measured and the estimator traced), fed with real
micro-batches. Every rank runs the same number of steps and micro-batches; rank 0 alone writes ``metrics.jsonl``,
prints, and shows the progress bar.

A stop request (SIGINT or SIGTERM to a rank, or the supervisor's stop file) is agreed on by all ranks at the start of
the next step, which then saves a checkpoint and ends the attempt as ``interrupted``. An out-of-memory error ends it
as ``oom``; a single process whose error came before the optimizer step (weights untouched) first saves the state
of the last finished step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from memtune.train import checkpoint as ckpt
from memtune.records import metric_rows
from memtune.runconfig import RunConfig
from memtune.plan import Plan

METRICS = "metrics.jsonl"
STOP_FILE = ".stop-request"
FAULT_ENV = "MEMTUNE_FAULT"
"""Test hook, ``KIND@STEP``: ``oom`` raises an out-of-memory error in the backward pass of step STEP, ``sigterm``
and ``kill`` send that signal to the process after step STEP, ``sigterm-eval`` sends SIGTERM as the evaluation after
step STEP starts, ``error`` raises a RuntimeError after step STEP; only rank 0 of the first plan (attempt 0) is
affected."""


@dataclass(frozen=True, kw_only=True)
class Job:
    """What one attempt runs: the model, the plan, the run settings and where to write."""

    model_name: str
    model_config: str
    """The model's config as canonical JSON (``ModelSpec.config_json``)."""
    weights_dir: str | None
    tokenizer: str
    plan: Plan
    run: RunConfig
    output_dir: str
    attempt: int = 0
    """Index of the plan among the run's plans (0: the plan file's own)."""

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**d, "plan": self.plan.to_dict(), "run": self.run.to_dict()}

    @classmethod
    def from_json(cls, d: dict) -> "Job":
        return cls(**{**d, "plan": Plan.from_dict(d["plan"]), "run": RunConfig.from_dict(d["run"])})


@dataclass(frozen=True, kw_only=True)
class Outcome:
    status: str
    """``finished``, ``interrupted``, ``oom`` or ``failed``."""
    at_step: int
    """The step that ran out of memory or failed, else the last finished step."""
    message: str = ""
    saved_step: int | None = None
    """The checkpoint written on the way out, if any."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


_COUNTERS = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "tokens": 0, "samples_in_epoch": 0}


class Trainer:
    """The training loop of one attempt on one rank."""

    def __init__(self, job: Job, *, device: torch.device, mesh=None, rank: int = 0, world_size: int = 1):
        self.job, self.plan, self.run = job, job.plan, job.run
        self.device, self.mesh, self.rank, self.world_size = device, mesh, rank, world_size
        self.output_dir = Path(job.output_dir)
        self.main = rank == 0
        self.counters = dict(_COUNTERS)
        self.phase = None
        self.stop_requested = False
        self._handlers: dict = {}
        self.fault = _fault(job)
        self.console = None

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from rich.console import Console

        from memtune.specs.model import spec_from_config
        from memtune.train import data as train_data
        from memtune.train import recipe

        self.console = Console(highlight=False) if self.main else None
        recipe.use_plan_allocator(self.plan, self.device)
        torch.manual_seed(self.run.seed)
        random.seed(self.run.seed)
        spec = dataclasses.replace(spec_from_config(self.job.model_name, self.job.model_config),
                                   weights_dir=self.job.weights_dir)
        self.spec = spec
        self.tokenizer = train_data.load_tokenizer(self.job.tokenizer, vocab_size=spec.vocab_size)
        self.data = train_data.load_run_data(self.run, self.tokenizer, seq_len=self.plan.seq_len,
                                             batching=self.plan.batching)
        if self.data.train.truncated:
            self.print(f"{self.data.train.truncated} training samples are longer than seq_len {self.plan.seq_len} "
                       "and were cut")
        self.sampler = train_data.StepBatchSampler(
            self.data.train.lengths, batch_size=self.plan.batch_size, micro_batches_per_step=self.plan.grad_accum,
            world_size=self.world_size, rank=self.rank, seed=self.run.seed,
            group_by_length=self.plan.batching == "padding")
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = self.run.max_steps or self.run.epochs * self.steps_per_epoch
        self.model = recipe.build_model(spec, self.plan, device=self.device, mesh=self.mesh,
                                        load_weights=not self.run.random_init)
        self.optimizer = recipe.build_optimizer(self.model, self.plan, lr=self.run.lr,
                                                weight_decay=self.run.weight_decay)
        self.scheduler = self._scheduler()
        cuda = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.plan.precision == "amp-fp16" and cuda else None
        # A LoRA run's frozen base is loaded again on resume, unless it is a random init only the checkpoint has.
        random_base = self.run.random_init and self.plan.quantization == "none"
        self.ignore_frozen = self.plan.peft == "lora" and not random_base
        self._resume()
        if self.main:
            self._trim_metrics(self.counters["step"])

    def _scheduler(self):
        from memtune.train import recipe

        return recipe.build_scheduler(self.optimizer, total_steps=self.total_steps, warmup_steps=self.run.warmup_steps,
                                      schedule=self.run.schedule, min_lr_ratio=self.run.min_lr_ratio)

    def _resume(self) -> None:
        saved = ckpt.latest_checkpoint(self.output_dir)
        if saved is None:
            return
        if not ckpt.model_state_carries(saved.plan, self.plan):
            self.print(f"the checkpoint of step {saved.step} has other trainable parameters "
                       f"(peft {saved.plan.peft}); this plan starts from step 0")
            return
        with_optimizer = ckpt.optimizer_state_carries(saved.plan, self.plan)
        counters = ckpt.load_checkpoint(saved, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                        scaler=self.scaler, counters=dict(_COUNTERS), ignore_frozen=self.ignore_frozen,
                                        with_optimizer=with_optimizer, rank=self.rank, world_size=self.world_size)
        self.counters = {k: int(v) for k, v in counters.items()}
        step = self.counters["step"]
        if not with_optimizer:
            self.print(f"optimizer {saved.plan.optimizer} -> {self.plan.optimizer}: the optimizer state starts afresh")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # stepping the schedule to the checkpoint's step, no updates
                for _ in range(step):
                    self.scheduler.step()
        per_step = self.plan.batch_size * self.plan.grad_accum * self.world_size
        consumed = self.counters["micro_in_epoch"] * self.world_size * self.plan.batch_size
        same_geometry = saved.plan.batch_size * saved.plan.grad_accum * saved.world_size == per_step and \
            consumed == self.counters["samples_in_epoch"]
        if not same_geometry:  # another batch geometry: continue at about the same sample of the epoch
            steps = self.counters["samples_in_epoch"] // per_step
            if steps >= self.steps_per_epoch:
                self.counters.update(epoch=self.counters["epoch"] + 1, micro_in_epoch=0, samples_in_epoch=0)
            else:
                self.counters["micro_in_epoch"] = steps * self.plan.grad_accum
                self.counters["samples_in_epoch"] = steps * per_step
        self.print(f"resuming from the checkpoint of step {step} (epoch {self.counters['epoch']})")

    def _trim_metrics(self, step: int) -> None:
        """Drop the rows after ``step``: they are trained again."""
        path = self.output_dir / METRICS
        if not path.exists():
            return
        kept = [line for line, row in metric_rows(path) if row["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))

    # ---------------------------------------------------------------- train
    def train(self) -> Outcome:
        from memtune.train import data as train_data
        from memtune.train import recipe

        c = self.counters
        if c["step"] >= self.total_steps:
            return self._finish()
        loader = self._loader()
        metrics = (self.output_dir / METRICS).open("a") if self.main else None
        progress = self._progress()
        last = {"time": time.perf_counter(), "step": c["step"], "tokens": c["tokens"]}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with recipe.collection_between_steps() as collect:
            try:
                while c["step"] < self.total_steps:
                    step = c["step"] + 1
                    start_rng = ckpt.rng_state() if self.world_size == 1 else None
                    batches = [next(loader) for _ in range(self.plan.grad_accum)]  # an epoch is whole steps
                    tokens = sum(int(b.pop("lengths").sum()) for b in batches)
                    targets = sum(train_data.count_targets(b) for b in batches)
                    stop = self.stop_requested or (self.main and (self.output_dir / STOP_FILE).exists())
                    totals = self._sum([targets, tokens, float(stop)])
                    if totals[2] > 0:
                        saved = self.save(step - 1)
                        self.print(f"stopped: checkpoint of step {step - 1} saved; run the same command to resume")
                        return Outcome(status="interrupted", at_step=step - 1, saved_step=saved)
                    batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in batches]
                    num_targets = torch.tensor(max(totals[0], 1.0) / self.world_size, device=self.device)
                    lr = self.optimizer.param_groups[0]["lr"]
                    try:
                        result = recipe.train_step_on_batches(
                            self.model, self.optimizer, batches, self.plan, num_targets=num_targets, scaler=self.scaler,
                            max_grad_norm=self.run.clip_norm, on_phase=lambda phase: self._on_phase(phase, step))
                    except torch.OutOfMemoryError as e:
                        del batches
                        return self._out_of_memory(e, step, start_rng)
                    self.scheduler.step()
                    c["step"] = step
                    c["micro_in_epoch"] += self.plan.grad_accum
                    c["samples_in_epoch"] += self.plan.batch_size * self.plan.grad_accum * self.world_size
                    c["tokens"] += int(totals[1])
                    if c["micro_in_epoch"] >= self.steps_per_epoch * self.plan.grad_accum:
                        c["epoch"] += 1
                        c["micro_in_epoch"] = c["samples_in_epoch"] = 0
                        loader = self._loader()
                    if step % self.run.log_every == 0 or step == self.total_steps:
                        row = self._log_row(step, lr, result, last)
                        last = {"time": time.perf_counter(), "step": step, "tokens": c["tokens"]}
                        if self.main:
                            metrics.write(json.dumps(row) + "\n")
                            metrics.flush()
                            self._show(progress, row)
                    elif progress is not None:
                        progress.update(progress.task_ids[0], completed=step)
                    if self.data.eval is not None and self.run.eval_every and step % self.run.eval_every == 0 \
                            and step < self.total_steps:
                        self._eval_row(step, metrics)
                    if self.run.checkpoint_every and step % self.run.checkpoint_every == 0 and step < self.total_steps:
                        self.save(step)
                    collect(step)
                    self._after_step(step)
            finally:
                if progress is not None:
                    progress.stop()
                if metrics is not None:
                    metrics.close()
        if self.data.eval is not None:
            with (self.output_dir / METRICS).open("a") if self.main else contextlib.nullcontext() as out:
                self._eval_row(c["step"], out)
        return self._finish()

    def _finish(self) -> Outcome:
        step = self.counters["step"]
        self.save(step)
        base = self.spec.weights_dir or self.spec.hub_id
        ckpt.export_final(self.output_dir / "final", self.model, self.plan, self.spec, rank=self.rank,
                          base_is_random=self.run.random_init, base_source=base, tokenizer=self.tokenizer)
        self.print(f"finished {step} steps; model exported to {self.output_dir / 'final'}")
        return Outcome(status="finished", at_step=step)

    def _loader(self):
        from torch.utils.data import DataLoader

        from memtune.train import data as train_data

        self.sampler.set_epoch(self.counters["epoch"], self.counters["micro_in_epoch"])
        pad = self.data.pad_token_id
        # Its own generator: a DataLoader iterator draws a seed, which must not come from the global RNG (dropout's).
        return iter(DataLoader(self.data.train, batch_sampler=self.sampler, generator=torch.Generator(),
                               collate_fn=lambda samples: _with_lengths(train_data.collate(samples, pad_token_id=pad),
                                                                        samples)))

    def _on_phase(self, phase: str, step: int) -> None:
        self.phase = phase
        if self.fault == ("oom", step) and phase == "backward":
            raise torch.OutOfMemoryError("CUDA out of memory (injected by MEMTUNE_FAULT)")

    def _after_step(self, step: int) -> None:
        kind, at = self.fault or (None, None)
        if at != step:
            return
        if kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "error":
            raise RuntimeError(f"injected failure after step {step} (MEMTUNE_FAULT)")

    def _out_of_memory(self, error: Exception, step: int, start_rng: dict | None) -> Outcome:
        message = (str(error).splitlines() or ["out of memory"])[0]
        saved = None
        # A single process can save the last finished step if the optimizer had not started updating the weights.
        if self.world_size == 1 and self.phase in ("forward", "backward"):
            self.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                saved = self.save(step - 1, rng=start_rng)
            except torch.OutOfMemoryError:
                saved = None
        return Outcome(status="oom", at_step=step, message=message, saved_step=saved)

    # ---------------------------------------------------------------- metrics, evaluation, checkpoints
    def _sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def _log_row(self, step: int, lr: float, result, last: dict) -> dict:
        loss = result.loss.float()
        if self.world_size > 1:
            dist.all_reduce(loss)
            loss = loss / self.world_size
        norm = result.grad_norm
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        allocated = reserved = None
        if self.device.type == "cuda":
            peaks = torch.tensor([torch.cuda.max_memory_allocated(self.device),
                                  torch.cuda.max_memory_reserved(self.device)], device=self.device)
            if self.world_size > 1:
                dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
            allocated, reserved = (int(x) for x in peaks.tolist())
            torch.cuda.reset_peak_memory_stats(self.device)
        elapsed = time.perf_counter() - last["time"]
        tokens = self.counters["tokens"]
        return {"step": step, "epoch": round(step / self.steps_per_epoch, 4), "loss": float(loss),
                "lr": lr, "grad_norm": float(norm), "tokens": tokens,
                "tokens_per_s": (tokens - last["tokens"]) / elapsed if elapsed > 0 else None,
                "step_time_s": elapsed / max(1, step - last["step"]),
                "peak_allocated_bytes": allocated, "peak_reserved_bytes": reserved}

    def _eval_row(self, step: int, out) -> None:
        if self.fault == ("sigterm-eval", step):
            os.kill(os.getpid(), signal.SIGTERM)
        loss = self.evaluate()
        if loss is None:
            self.print(f"step {step}: evaluation stopped (stop requested)")
            return
        if self.main:
            out.write(json.dumps({"step": step, "eval_loss": loss}) + "\n")
            out.flush()
            self.print(f"step {step}: eval loss {loss:.4f}")

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per target token over the held-out samples (all ranks); None when a stop request (signal or stop
        file, on any rank) came during it: the evaluation ends at the next batch, so that the checkpoint or the
        final weights are saved without waiting for the rest of it."""
        from memtune.train import data as train_data
        from memtune.train import recipe

        samples = self.data.eval
        groups = train_data.eval_groups(samples.lengths, batch_size=self.plan.batch_size,
                                        world_size=self.world_size, rank=self.rank)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        one = torch.tensor(1.0, device=self.device)
        self.model.eval()
        try:
            for group in groups:
                stop = self.stop_requested or (self.main and (self.output_dir / STOP_FILE).exists())
                if self._sum([float(stop)])[0] > 0:
                    self.stop_requested = True
                    return None
                items = [samples[i] for i in (group or [0])]
                batch = train_data.collate(items, pad_token_id=self.data.pad_token_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with recipe.autocast(self.plan, self.device.type):
                    summed = self.model(**batch, use_cache=False, num_items_in_batch=one).loss
                if group is not None:
                    totals += torch.stack([summed.double(), torch.tensor(float(train_data.count_targets(batch)),
                                                                         dtype=torch.float64, device=self.device)])
        finally:
            self.model.train()
        if self.world_size > 1:
            dist.all_reduce(totals)
        return float(totals[0] / totals[1].clamp(min=1))

    def save(self, step: int, *, rng: dict | None = None) -> int:
        """Save the checkpoint of ``step`` (all ranks), unless it is the newest one already."""
        latest = ckpt.latest_checkpoint(self.output_dir)
        if latest is not None and latest.step == step:
            return step
        ckpt.save_checkpoint(self.output_dir, step=step, plan=self.plan, model=self.model, optimizer=self.optimizer,
                             scheduler=self.scheduler, scaler=self.scaler, counters=self.counters,
                             ignore_frozen=self.ignore_frozen, rank=self.rank, world_size=self.world_size,
                             keep=self.run.keep_checkpoints, rng=rng)
        return step

    # ---------------------------------------------------------------- console (rank 0)
    def print(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, soft_wrap=True)

    def _progress(self):
        if self.console is None or not self.console.is_terminal:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"),
                            TextColumn("{task.fields[memory]}"), TimeRemainingColumn(), console=self.console)
        progress.add_task("train", total=self.total_steps, completed=self.counters["step"], loss="-", speed="",
                          memory="")
        progress.start()
        return progress

    def _show(self, progress, row: dict) -> None:
        speed = f"{row['tokens_per_s']:,.0f} tok/s" if row["tokens_per_s"] else ""
        memory = f"{row['peak_allocated_bytes'] / 2**30:.2f} GiB" if row["peak_allocated_bytes"] else ""
        if progress is not None:
            progress.update(progress.task_ids[0], completed=row["step"], loss=f"{row['loss']:.4f}", speed=speed,
                            memory=memory)
        else:
            self.print(f"step {row['step']}/{self.total_steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                       f"grad norm {row['grad_norm']:.3f}  {speed}  {memory}".rstrip())

    # ---------------------------------------------------------------- signals
    def __enter__(self) -> "Trainer":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._handlers[sig] = signal.signal(sig, self._request_stop)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._handlers.clear()

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.stop_requested = True
        self.print(f"{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to stop now)")

    def cleanup(self) -> None:
        for name in ("model", "optimizer", "scheduler", "scaler"):
            if hasattr(self, name):
                delattr(self, name)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _with_lengths(batch: dict, samples: list[dict]) -> dict:
    batch["lengths"] = torch.tensor([len(s["input_ids"]) for s in samples])
    return batch


def _fault(job: Job) -> tuple[str, int] | None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or job.attempt != 0 or int(os.environ.get("RANK", "0")) != 0:
        return None
    kind, _, step = spec.partition("@")
    return kind, int(step)


def run_attempt(job: Job, *, device: torch.device, mesh=None, rank: int = 0, world_size: int = 1) -> Outcome:
    """Set up, train and clean up one attempt; an out-of-memory error while building is an ``oom`` outcome too."""
    trainer = Trainer(job, device=device, mesh=mesh, rank=rank, world_size=world_size)
    with trainer:
        try:
            trainer.setup()
            return trainer.train()
        except torch.OutOfMemoryError as e:
            return Outcome(status="oom", at_step=trainer.counters["step"] + 1,
                           message=(str(e).splitlines() or ["out of memory"])[0])
        finally:
            trainer.cleanup()
