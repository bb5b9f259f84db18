import json

import pytest

from memtune.errors import ConfigError, UnknownGpuError, UnknownModelError
from memtune.specs import known_gpus, known_models, resolve_gpu, resolve_model
from memtune.units import MiB

# Published totals of the models (tied embeddings counted once).
EXACT_PARAMS = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-guard-3-1b": 1_498_482_688,  # Llama-3.2-1B + an untied 128256 x 2048 lm_head
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "llama-guard-3-8b": 8_030_261_248,
    "mistral-7b": 7_248_023_552,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "gemma-2-2b": 2_614_341_888,
}


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_profile_parameter_counts_are_exact(name):
    assert resolve_model(name).num_params == EXACT_PARAMS[name]


def test_every_shipped_model_profile_is_listed_and_loads():
    assert sorted(EXACT_PARAMS) == known_models()


def test_guard_lm_head_is_untied_and_llama_is_tied():
    assert not resolve_model("llama-guard-3-1b").tie_word_embeddings
    assert resolve_model("llama-3.2-1b").tie_word_embeddings


def test_tiny_config_closed_form_count(tiny):
    # embed 256*64 + lm_head 64*256 + final norm 64
    # per layer: q 64*64, k 64*32, v 64*32, o 64*64, gate/up 64*128 each, down 128*64, 2 norms of 64
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    assert tiny.num_params == 256 * 64 * 2 + 64 + 2 * per_layer
    assert tiny.linear_names == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")


def test_model_from_folder_and_case_insensitive_profile(tmp_path, tiny):
    (tmp_path / "config.json").write_text(json.dumps(tiny.config))
    assert resolve_model(str(tmp_path)).num_params == tiny.num_params
    assert resolve_model("Llama-Guard-3-1B").num_params == EXACT_PARAMS["llama-guard-3-1b"]


def test_model_from_local_hub_cache(tmp_path, monkeypatch, tiny):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(tiny.config))
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model("acme/tiny").num_params == tiny.num_params


def test_unknown_model_lists_profiles():
    with pytest.raises(UnknownModelError, match="llama-guard-3-1b"):
        resolve_model("no-such-model")


def test_malformed_config_is_a_config_error(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_model(str(bad))
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type"):
        resolve_model(str(bad))


def test_gpu_names_are_case_insensitive_and_aliases_work():
    assert resolve_gpu("l4-24gb").name == "L4-24GB"
    assert resolve_gpu("NVIDIA H200").name == "H200-141GB"
    assert resolve_gpu("v100-32gb").memory_bytes == 32510 * MiB


def test_unknown_gpu_lists_known_names():
    with pytest.raises(UnknownGpuError, match="V100-32GB"):
        resolve_gpu("GTX-480")


def test_gpu_table_is_complete_and_sourced():
    required = {"V100-16GB", "V100-32GB", "T4-16GB", "L4-24GB", "A10G-24GB", "A100-40GB", "A100-80GB", "H100-80GB",
                "H200-141GB", "RTX-3090", "RTX-4090"}
    table = {g.name: g for g in known_gpus()}
    assert required <= set(table)
    for g in table.values():
        assert g.source and g.memory_bytes > 0 and g.bandwidth_gbs > 0
        assert g.bf16 == (g.compute_capability >= (8, 0))


def test_every_calibration_profile_loads():
    import json

    from memtune.profiles import profiles_dir

    files = sorted((profiles_dir() / "calibration").glob("*.json"))
    assert files
    known = {g.name for g in known_gpus()}
    for path in files:
        data = json.loads(path.read_text())
        assert path.stem in known and data["gpu"] == path.stem and data["measured_with"]
        for family in data["families"].values():
            assert family["configurations"] > 0 and family["allocated"]["max"] > 0.9
        util = data["utilization"]
        assert 0 < util["u_max"] <= 1 and util["x_half"] > 0 and util["class_factor"]["16bit/none"] > 0


def test_malformed_config_sizes_are_bad_input(tmp_path):
    from pathlib import Path

    base = json.loads((Path(__file__).resolve().parents[2] / "profiles/models/llama-3.2-1b/config.json").read_text())
    for key, value, said in (("hidden_size", -2048, "hidden_size"), ("hidden_size", "2048", "hidden_size"),
                             ("hidden_size", 2048.5, "hidden_size"), ("num_attention_heads", 7, "multiple"),
                             ("num_hidden_layers", True, "num_hidden_layers"),
                             ("hidden_size", 10**12, "outside 1..1,048,576"), ("vocab_size", 0, "vocab_size"),
                             ("intermediate_size", 2**40, "intermediate_size")):
        path = tmp_path / f"{key}-{value}.json"
        path.write_text(json.dumps({**base, key: value}))
        with pytest.raises(ConfigError, match=said):
            resolve_model(str(path))
    binary = tmp_path / "binary.json"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_model(str(binary))


def test_a_family_name_with_several_sizes_asks_which():
    for family, sizes in (("A100", ("A100-40GB", "A100-80GB")), ("v100", ("V100-16GB", "V100-32GB"))):
        with pytest.raises(UnknownGpuError, match="say which") as e:
            resolve_gpu(family)
        assert all(size in str(e.value) for size in sizes)
    assert resolve_gpu("L4").name == "L4-24GB" and resolve_gpu("NVIDIA A100-SXM4-40GB").name == "A100-40GB"


def test_a_deep_stack_is_counted_from_two_short_ones_exactly(tmp_path):
    """Past DEEP_LAYERS the spec extends the parameters of one and two periods of layers instead of building every
    layer (thousands take minutes): the count equals the full build's."""
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from memtune.specs.model import DEEP_LAYERS

    config = json.loads((Path(__file__).resolve().parents[1] / "assets/tiny-llama/config.json").read_text())
    config["num_hidden_layers"] = DEEP_LAYERS + 36
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    spec = resolve_model(str(path))
    hf = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(hf)
    assert spec.num_layers == DEEP_LAYERS + 36
    assert spec.num_params == sum(p.numel() for p in full.parameters())


def test_a_model_spec_is_counted_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    """Counting parameters builds the model on the meta device (seconds for a large one); the count is kept in
    memtune's cache, keyed by the config and the transformers version, and read back equal."""
    from memtune.specs import model as model_module

    monkeypatch.setenv("MEMTUNE_CACHE", str(tmp_path))
    model_module.spec_from_config.cache_clear()
    first = model_module.resolve_model("llama-guard-3-1b")
    cached = list((tmp_path / "specs").glob("*.json"))
    assert len(cached) == 1
    model_module.spec_from_config.cache_clear()
    monkeypatch.setattr(model_module, "_build_spec", lambda *a: pytest.fail("rebuilt instead of read"))
    assert model_module.resolve_model("llama-guard-3-1b") == first
    model_module.spec_from_config.cache_clear()


def test_the_spec_reads_the_layer_it_has_not_llama_names(tmp_path):
    """GPT-NeoX: a fused query_key_value, a plain (not gated) MLP and LayerNorms that keep no fp32 copy; Llama: a
    gated MLP and two RMSNorms. The screen's activation terms follow these, not the model type."""
    import json

    from memtune.specs.model import default_lora_targets

    neox = {"model_type": "gpt_neox", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 256, "max_position_embeddings": 256, "rotary_pct": 0.25,
            "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(neox))
    spec = resolve_model(str(tmp_path / "config.json"))
    assert not spec.mlp_gated and spec.mlp_output_linear == "dense_4h_to_h"
    assert spec.norms_per_layer == 2 and not spec.norm_upcast
    assert default_lora_targets(spec) == ("query_key_value",)
    assert spec.layer_linears["query_key_value"] == (64, 3 * 64)
    llama = resolve_model("llama-guard-3-1b")
    assert llama.mlp_gated and llama.mlp_output_linear == "down_proj" and llama.norms_per_layer == 2
    assert llama.norm_upcast and default_lora_targets(llama) == ("q_proj", "v_proj")


def test_a_config_that_leaves_out_a_size_is_bad_input(tmp_path):
    # transformers would fill it with its class's default and size another model
    config = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256,
              "intermediate_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="hidden_size"):
        resolve_model(str(tmp_path / "config.json"))


def test_a_size_given_under_its_config_class_name_counts():
    from memtune.specs.model import _check_given

    # GPT-2 names them n_embd, n_layer and n_head (its config class maps the standard names to those)
    _check_given({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256}, "gpt2.json")
