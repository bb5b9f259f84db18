"""Checkpoints of a run: sharded with torch.distributed.checkpoint (DCP), plus the final export for transformers/peft.

``checkpoints/step_<N>/`` holds what an exact resume needs:

* DCP files: the model and optimizer state (``get_state_dict``: each rank writes its own FSDP shards, names as in
  the plain model, so a checkpoint loads under another sharding or world size), the LR scheduler, and the trainer's
  counters (step, epoch, position in the epoch's batches, tokens seen);
* ``rank<R>.pt``: each rank's random-number generator states (torch CPU and CUDA, Python), which dropout depends
  on, and the GradScaler's state (amp-fp16);
* ``meta.json``, written last: the step and the plan; a folder without it is an unfinished save and is ignored.

LoRA runs that start from loaded weights leave the frozen base out (it is loaded again on resume); a random-init base
is saved with the adapters, since only the checkpoint has it.

``final/`` is the export: ``save_pretrained`` of the whole model (full fine-tune), or of the LoRA adapters (peft)
plus, for a random-init base, that base under ``final/base``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from memtune.errors import MemtuneError
from memtune.plan import Plan

CHECKPOINTS = "checkpoints"
META = "meta.json"


@dataclass(frozen=True, kw_only=True, slots=True)
class SavedCheckpoint:
    step: int
    path: Path
    plan: Plan
    world_size: int


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step}"


def latest_checkpoint(output_dir: Path) -> SavedCheckpoint | None:
    """The newest complete checkpoint (with a readable ``meta.json``), or None. A ``meta.json`` that cannot be
    read (cut short or damaged) marks its checkpoint unfinished: it is skipped with a warning, and an older one is
    resumed from."""
    found = []
    for path in (Path(output_dir) / CHECKPOINTS).glob("step_*"):
        meta = path / META
        if meta.is_file() and path.name.removeprefix("step_").isdigit():
            try:
                data = json.loads(meta.read_text())
                found.append(SavedCheckpoint(step=int(data["step"]), path=path, plan=Plan.from_dict(data["plan"]),
                                             world_size=int(data["world_size"])))
            except (ValueError, KeyError, TypeError, MemtuneError) as e:
                warnings.warn(f"skipping checkpoint {path}: its {META} cannot be read ({type(e).__name__}: {e})",
                              stacklevel=2)
    return max(found, key=lambda c: c.step) if found else None


def model_state_carries(saved: Plan, plan: Plan) -> bool:
    """Whether ``plan``'s model has the same trainable parameters as ``saved``'s (any sharding, precision or
    checkpointing: DCP reshards and casts)."""
    lora = ("lora_rank", "lora_alpha", "lora_targets")
    return saved.peft == plan.peft and (plan.peft == "none" or all(getattr(saved, k) == getattr(plan, k) for k in lora))


def optimizer_state_carries(saved: Plan, plan: Plan) -> bool:
    """Whether the optimizer states of ``saved`` fit ``plan``'s optimizer (AdamW and fused AdamW keep the same
    states; 8-bit AdamW and SGD have their own)."""
    family = {"adamw": "adamw", "adamw-fused": "adamw"}
    return model_state_carries(saved, plan) and family.get(saved.optimizer, saved.optimizer) == \
        family.get(plan.optimizer, plan.optimizer)


class _TrainState(Stateful):
    """What DCP saves and loads in place: model, optimizer, scheduler and the trainer's counters. ``counters`` must
    have every key on load too (DCP loads into the structure it is given)."""

    def __init__(self, model, optimizer, scheduler, counters: dict, *, ignore_frozen: bool,
                 with_optimizer: bool = True):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.counters = dict(counters)
        self.options = StateDictOptions(ignore_frozen_params=ignore_frozen, strict=not ignore_frozen)
        self.with_optimizer = with_optimizer

    def state_dict(self) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.options)
        state = {"model": model_state, "counters": self.counters}
        if self.with_optimizer:
            state["optim"] = optim_state
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.with_optimizer:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=self.options)
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            set_model_state_dict(self.model, state["model"], options=self.options)
        self.counters = dict(state["counters"])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it saves in a single process when there is no process group: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(output_dir: Path, *, step: int, plan: Plan, model, optimizer, scheduler, scaler, counters: dict,
                    ignore_frozen: bool, rank: int, world_size: int, keep: int, rng: dict | None = None) -> Path:
    """Save ``checkpoints/step_<step>`` (every rank calls this) and keep the newest ``keep`` checkpoints.

    ``rng`` replaces this rank's current generator states (the states at the start of a step that did not finish).
    """
    path = checkpoint_path(output_dir, step)
    if rank == 0 and path.exists():
        shutil.rmtree(path)
    _barrier()
    state = _TrainState(model, optimizer, scheduler, counters, ignore_frozen=ignore_frozen)
    with _single_process_quiet():
        dcp.save({"train": state}, checkpoint_id=str(path), no_dist=not _distributed())
    own = {"rng": rng if rng is not None else rng_state(),
           "scaler": scaler.state_dict() if scaler is not None else None}
    torch.save(own, path / f"rank{rank}.pt")
    _barrier()
    if rank == 0:
        (path / META).write_text(json.dumps({"step": step, "plan": plan.to_dict(), "world_size": world_size}))
        complete = sorted((c for c in (Path(output_dir) / CHECKPOINTS).glob("step_*") if (c / META).is_file()),
                          key=lambda c: int(c.name.removeprefix("step_")))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def load_checkpoint(saved: SavedCheckpoint, *, model, optimizer, scheduler, scaler, counters: dict,
                    ignore_frozen: bool, with_optimizer: bool, rank: int, world_size: int) -> dict:
    """Load ``saved`` into the given objects (in place, every rank) and return the trainer's counters (``counters``
    gives their keys). Without ``with_optimizer`` only the model is loaded. The RNG states are restored when the world
    size is the same (each rank gets its own)."""
    state = _TrainState(model, optimizer, scheduler, counters, ignore_frozen=ignore_frozen,
                        with_optimizer=with_optimizer)
    with _single_process_quiet():
        dcp.load({"train": state}, checkpoint_id=str(saved.path), no_dist=not _distributed())
    own_file = saved.path / f"rank{rank}.pt"
    if saved.world_size == world_size and own_file.is_file():
        own = torch.load(own_file, weights_only=False)
        set_rng_state(own["rng"])
        if scaler is not None and own.get("scaler") and with_optimizer:
            scaler.load_state_dict(own["scaler"])
    return state.counters


def export_final(path: Path, model, plan: Plan, spec, *, rank: int, base_is_random: bool, base_source: str | None,
                 tokenizer=None) -> Path:
    """Write ``final/``: loadable with ``AutoModelForCausalLM.from_pretrained`` (full fine-tune) or
    ``PeftModel.from_pretrained(base, path)`` (LoRA; the base under ``path/base`` when it was a random init).

    The trained weights are gathered on rank 0 (``full_state_dict``) into a plain copy of the model built on the meta
    device - no sharding, checkpoint wrappers or quantization - whose ``save_pretrained`` writes the usual files.
    """
    from transformers.utils import logging as hf_logging

    from memtune.train import recipe

    hf_logging.disable_progress_bar()
    lora = plan.peft == "lora"
    full = get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora and not base_is_random))
    if rank == 0:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        plain = dataclasses.replace(plan, sharding="none", num_gpus=1, nodes=1, checkpointing="none",
                                    quantization="none")
        clean = recipe.build_model(spec, plain, device="meta")
        unexpected = clean.load_state_dict(full, strict=False, assign=True).unexpected_keys
        if unexpected:
            raise RuntimeError(f"the trained model's weights do not match a plain {spec.name}: {unexpected[:3]}")
        if lora:
            base = path / "base" if base_is_random else base_source
            for config in clean.peft_config.values():
                config.base_model_name_or_path = str(base) if base else None
            clean.save_pretrained(path)
            if base_is_random:
                clean.unload().save_pretrained(path / "base")
        else:
            clean.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
            if lora and base_is_random:
                tokenizer.save_pretrained(path / "base")
    _barrier()
    return path
