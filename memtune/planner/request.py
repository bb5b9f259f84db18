"""SearchRequest: what a plan search is asked, checked in one place before anything is estimated."""

from __future__ import annotations

import math

from dataclasses import dataclass, field

from memtune.errors import ConfigError
from memtune.plan import Plan
from memtune.specs.gpu import GpuSpec
from memtune.specs.model import ModelSpec, resolve_lora_targets

FIXABLE = ("precision", "checkpointing", "peft", "quantization", "optimizer", "attention", "grad_accum", "sharding",
           "offload", "expandable_segments", "lora_rank", "kbit_upcast", "stack", "lora_targets")
"""Plan fields a search can fix for every candidate."""


@dataclass(frozen=True, kw_only=True)
class SearchRequest:
    num_gpus: int = 1
    nodes: int = 1
    batch_size: int = 1
    seq_len: int = 2048
    batching: str | None = None
    """padding or packing; None searches padding (and packing too when there is a dataset)."""
    global_batch: int | None = None
    """Sequences per optimizer step over all GPUs: every micro-batch x accumulation split is searched."""
    fixed: dict = field(default_factory=dict)
    """Plan fields fixed for every candidate (``FIXABLE``)."""
    network_gbs: float = 25.0
    lengths: object = None
    """``memtune.data.LengthStats`` of the dataset, when there is one."""
    export: str | None = None
    """Search only what this tool can run (``memtune.planner.export.EXPORTERS``)."""

    @classmethod
    def from_options(cls, spec: ModelSpec, *, global_tokens: int | None = None, lora_targets: str | None = None,
                     dataset: str | None = None, text_field: str = "text", length_field: str | None = None,
                     tokenizer: str | None = None, prompt_tokens: int = 0, **options) -> SearchRequest:
        """A request from command-line values (None: not given). Raises ConfigError for any that cannot be used:
        an unknown export, a non-positive bandwidth, both global sizes, a fixed knob that is not a plan's, LoRA
        targets the model does not have."""
        from memtune.planner import with_fixed
        from memtune.planner.export import EXPORTERS

        given = {k: options.pop(k, None) for k in FIXABLE}
        fixed = {k: v for k, v in given.items() if v is not None}
        export = options.get("export")
        if export is not None and export not in EXPORTERS:
            raise ConfigError(f"--export must be {', '.join(EXPORTERS)}, not {export!r}")
        if export is not None:  # the estimate of what that tool runs (the torchrun command runs llama-cookbook)
            stack = "hf" if export == "hf" else "llama-cookbook"
            if fixed.get("stack", stack) != stack:
                raise ConfigError(f"--export {export} estimates what {export} runs (--stack {stack}), not "
                                  f"--stack {fixed['stack']}: drop one of them")
            fixed["stack"] = stack
        network = options.get("network_gbs", 25.0)
        if not (math.isfinite(network) and network > 0):
            raise ConfigError(f"--network-gbs must be a positive number of GB/s, not {network!r}")
        if prompt_tokens < 0:
            raise ConfigError(f"--prompt-tokens must be 0 or more, not {prompt_tokens}")
        if options.get("batching") not in (None, "padding", "packing"):
            raise ConfigError(f"--batching must be padding or packing, not {options['batching']!r}")
        if lora_targets is not None:
            targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
            if not targets:
                raise ConfigError("--lora-targets names no layer: give comma-separated layer names, or all-linear")
            fixed["lora_targets"] = resolve_lora_targets(targets, spec)
        lora_given = [f"--{k.replace('_', '-')}" for k in ("lora_rank", "lora_targets") if k in fixed]
        if lora_given and fixed.get("peft") == "none":
            raise ConfigError(f"{' and '.join(lora_given)} set the LoRA candidates, and --peft none leaves none: "
                              f"drop one of them")
        if fixed:
            with_fixed(Plan(), fixed)  # an unknown value or impossible combination is bad input
            if "lora_targets" in fixed:
                Plan(peft="lora", lora_targets=fixed["lora_targets"], seq_len=1).check_model(spec)
        if global_tokens is not None:
            if global_tokens < 1:
                raise ConfigError(f"--global-tokens must be at least 1, not {global_tokens}")
            if options.get("global_batch") is not None:
                raise ConfigError("give --global-batch (sequences) or --global-tokens, not both")
            options["global_batch"] = max(1, round(global_tokens / options.get("seq_len", 2048)))
        if options.get("batch_size") is None:
            options["batch_size"] = 1
        elif options["batch_size"] < 1:
            raise ConfigError(f"--batch-size must be at least 1 sequence, not {options['batch_size']}")
        elif options.get("global_batch") is not None:  # a micro-batch given with a global batch fixes the split
            fixed["batch_size"] = options["batch_size"]
        lengths = None
        if dataset:
            from memtune.data import load_lengths

            lengths = load_lengths(dataset, text_field=text_field, length_field=length_field, tokenizer=tokenizer,
                                   extra_tokens=prompt_tokens)
        return cls(fixed=fixed, lengths=lengths, **options)

    @property
    def data(self) -> dict | None:
        """The dataset's length statistics as the plan result records them."""
        if self.lengths is None:
            return None
        data = self.lengths.to_json()
        if self.batching != "packing":
            data["padding_efficiency"] = self.lengths.padded(self.batch_size)[1]
        return data

    def search(self, spec: ModelSpec, gpu: GpuSpec):
        """``memtune.planner.plan_candidates`` for this request: the ``PlanResult``."""
        from memtune.planner import plan_candidates
        from memtune.planner.export import expressible

        return plan_candidates(spec, gpu, num_gpus=self.num_gpus, nodes=self.nodes, batch_size=self.batch_size,
                               seq_len=self.seq_len, batching=self.batching, data=self.data, fixed=dict(self.fixed),
                               global_batch=self.global_batch, lengths=self.lengths, network_gbs=self.network_gbs,
                               runs_with=expressible(self.export) if self.export else None)
