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
