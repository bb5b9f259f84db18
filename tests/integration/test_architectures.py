"""plan works for architectures other than Llama's: a tiny config of each (fused projections, GPT-NeoX's names,
mixture-of-experts) gets full fine-tune, LoRA and QLoRA candidates that are estimated, not dropped, with LoRA targets
the model has."""

import json

import pytest
from typer.testing import CliRunner

from memtune.cli import app

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256, "tie_word_embeddings": False}
ARCHITECTURES = {
    "llama": {}, "qwen2": {}, "qwen3": {"head_dim": 16}, "mistral": {}, "olmo2": {}, "granite": {},
    "phi3": {"num_key_value_heads": 4, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "gpt_neox": {"rotary_pct": 0.25, "num_key_value_heads": 4},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_plan_offers_every_kind_of_fine_tune_for(model_type, tmp_path):
    config = {"model_type": model_type, **SMALL, **ARCHITECTURES[model_type]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(app, ["plan", "--model", str(tmp_path / "config.json"), "--gpu", "A100-80GB",
                                 "--seq-len", "64", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    estimated = [c["plan"] for c in out["candidates"] if c["fits"] is not None and c.get("verdict")]
    kinds = {(p["peft"], p["quantization"]) for p in estimated}
    assert {("none", "none"), ("lora", "none"), ("lora", "4bit")} <= kinds, kinds
    r = CliRunner().invoke(app, ["models"])  # the spec is readable the way the models table reads it
    lora = next(p for p in estimated if p["peft"] == "lora")
    assert lora["lora_targets"], lora


MEDIUM = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 8,
          "num_key_value_heads": 8, "vocab_size": 4096, "max_position_embeddings": 2048, "tie_word_embeddings": False}
EXPERTS = {"mixtral": {"num_local_experts": 16, "num_experts_per_tok": 8, "intermediate_size": 256},
           "olmoe": {"num_experts": 16, "num_experts_per_tok": 8, "intermediate_size": 256}}
"""Routed as real mixtures of experts are (OLMoE: top 8 of 64), so the experts' activations weigh as they do there."""
KINDS = ({}, {"peft": "lora"}, {"peft": "lora", "quantization": "4bit"}, {"checkpointing": "full"},
         {"peft": "lora", "checkpointing": "selective"})


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_the_screen_stays_within_its_band_of_the_trace_for(model_type, tmp_path):
    """The planner's closed-form screen reads the layer the model has (fused projections, GPT-NeoX's names, experts:
    their routed copies' activations), so for every architecture it stays within the band its class of plans was
    measured to need (``profiles/screen_bands.json``)."""
    import dataclasses

    from memtune.estimate import estimate
    from memtune.estimate.screen import screen, screen_band
    from memtune.plan import Plan
    from memtune.specs import resolve_gpu, resolve_model
    from memtune.specs.model import default_lora_targets

    extra = {k: v for k, v in ARCHITECTURES[model_type].items() if k not in ("head_dim", "num_key_value_heads")}
    extra.update(EXPERTS.get(model_type, {}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **MEDIUM, **extra}))
    spec, gpu = resolve_model(str(tmp_path / "config.json")), resolve_gpu("A100-80GB")
    for kind in KINDS:
        plan = Plan(batch_size=8, seq_len=512, **kind)
        if plan.peft == "lora":
            plan = dataclasses.replace(plan, lora_targets=default_lora_targets(spec))
        error = screen(spec, plan, gpu).required_bytes / estimate(spec, plan, gpu, fast=True).required_bytes - 1
        under, over = screen_band(plan)
        assert -under <= error <= over, (kind, error)
