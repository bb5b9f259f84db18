"""ModelSpec: the architecture facts memtune needs, from any Hugging Face ``config.json``.

Nothing is downloaded: the model is instantiated on the meta device to count parameters exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from memtune.errors import ConfigError, UnknownModelError
from memtune.profiles import profiles_dir


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    name: str
    """Profile name, path or cache id the user gave."""
    config_json: str
    """The config as canonical JSON (sorted keys): the identity of the architecture."""
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    num_params: int
    """Exact parameter count of the causal-LM model (tied weights counted once), from the meta device."""
    linear_names: tuple[str, ...]
    """Leaf names of the ``nn.Linear`` modules inside a decoder layer (what LoRA can target)."""
    linear_shapes: tuple[tuple[str, int, int], ...] = ()
    """``(leaf name, in features, out features)`` of the ``nn.Linear`` modules of a decoder layer, as the model has
    them (fused projections, GPT-NeoX's names, expert linears: out features times their number), averaged over the
    layers built."""
    attention_linears: tuple[str, ...] = ()
    """Leaf names of the linears inside a decoder layer's attention block."""
    norms_per_layer: int = 0
    """Normalization modules directly in a decoder layer (2 for Llama, 4 for Gemma-2); 0 where unknown."""
    norm_upcast: bool = True
    """Whether those norms compute in fp32 from a half-precision input (transformers' RMSNorm classes do; PyTorch's
    ``nn.LayerNorm`` does not), which their backward keeps."""
    expert_params: int = 0
    """Parameters per decoder layer held as stacked expert weights (3-D tensors, not linears: transformers 5's
    mixture-of-experts), all experts counted."""
    active_experts: float = 1.0
    """The share of those a token runs (``num_experts_per_tok`` over the number of experts)."""
    experts: int = 0
    """Routed experts per mixture-of-experts layer (0 for a dense model)."""
    experts_per_token: int = 0
    """Experts each token is routed to (top-k)."""
    attention_norm_elements: int = 0
    """Elements per token that norms inside attention normalize (OLMo-2's, Qwen3's and Gemma-3's query and key
    norms: over the whole projection, or per head)."""
    period: int = 0
    """Layers per repetition of the stack's layer types, as read when the spec was made (0: read it from the
    config on use); see ``layer_period``."""
    hub_id: str | None = None
    """The Hugging Face Hub id the config names (``_name_or_path``), for exports to other tools."""
    weights_dir: str | None = None
    """The folder holding the model's weights (safetensors or PyTorch bins) next to its config, if any."""

    @property
    def layer_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of a decoder layer, by leaf name: the model's own
        (``linear_shapes``), or for a spec made without them the Llama-shaped attention and gated MLP."""
        if self.linear_shapes:
            return {name: (i, o) for name, i, o in self.linear_shapes}
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def mlp_gated(self) -> bool:
        """A gated MLP (``down(act(gate(x)) * up(x))``: two projections, or one fused, from hidden to twice the
        intermediate size) rather than ``fc2(act(fc1(x)))``; gated where the layer's shapes are not known."""
        h, i = self.hidden_size, self.intermediate_size
        into = [o for _, a, o in self.linear_shapes if a == h and o in (i, 2 * i)]
        return not self.linear_shapes or len(into) >= 2 or 2 * i in into

    @property
    def dense_mlp(self) -> bool:
        """The layer has an MLP made of linears (a mixture-of-experts' shared expert counts; stacked experts do not):
        a linear outside attention from the hidden size to the intermediate size or twice it."""
        h, i = self.hidden_size, self.intermediate_size
        return not self.linear_shapes or any(n not in self.attention_linears and a == h and o in (i, 2 * i)
                                             for n, a, o in self.linear_shapes)

    @property
    def expert_intermediate(self) -> int:
        """An expert's intermediate size, from its stacked weights (gate, up and down projections)."""
        return self.expert_params // (3 * self.experts * self.hidden_size) if self.experts else 0

    @property
    def mlp_output_linear(self) -> str:
        """The leaf name of the MLP's last projection (intermediate to hidden): ``down_proj`` for Llama."""
        return next((n for n, a, o in self.linear_shapes if a == self.intermediate_size and o == self.hidden_size),
                    "down_proj")

    @property
    def config(self) -> dict:
        return json.loads(self.config_json)

    @property
    def layer_period(self) -> int:
        """Layers per repetition of the stack's pattern of layer types (Gemma-2 alternates sliding and global
        attention: 2; a uniform stack: 1)."""
        if self.period:
            return self.period
        types = getattr(self.hf_config(), "layer_types", None)  # transformers fills it in when the config omits it
        if isinstance(types, list) and types:
            return next(p for p in range(1, len(types) + 1)
                        if all(types[i] == types[i % p] for i in range(len(types))))
        return 1

    def hf_config(self, num_layers: int | None = None):
        """A transformers ``PretrainedConfig``; ``num_layers`` truncates the decoder stack (and ``layer_types``)."""
        from transformers import AutoConfig

        cfg = self.config
        if num_layers is not None:
            cfg["num_hidden_layers"] = num_layers
            if isinstance(cfg.get("layer_types"), list):
                cfg["layer_types"] = cfg["layer_types"][:num_layers]
        model_type = cfg.pop("model_type")
        cfg.pop("_name_or_path", None)
        return AutoConfig.for_model(model_type, **cfg)


def known_models() -> list[str]:
    """Names of the model profiles shipped in ``profiles/models``."""
    root = profiles_dir() / "models"
    return sorted(p.parent.name for p in root.glob("*/config.json"))


def find_config(model: str) -> Path:
    profile = profiles_dir() / "models" / model.lower() / "config.json"
    if profile.is_file():
        return profile
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path / "config.json"
        raise UnknownModelError(f"model folder {model} has no config.json; pass the folder of a Hugging Face model")
    if model.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        if isinstance(cached, str):
            return Path(cached)
    raise UnknownModelError(
        f"unknown model {model!r}: not a profile, a config.json path, a model folder or a local Hugging Face cache "
        f"entry; known profiles: {', '.join(known_models())}"
    )


def resolve_model(model: str) -> ModelSpec:
    """Build the ``ModelSpec`` for a profile name, a ``config.json`` path, a model folder or a cached Hub id.

    Raises:
        UnknownModelError: nothing found under that name.
        ConfigError: the config is not valid JSON or is not a causal language model transformers can build.
    """
    path = find_config(model)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise ConfigError(f"cannot read {path}: {type(e).__name__}; pass a valid Hugging Face config.json") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ConfigError(f"{path} has no 'model_type'; pass a Hugging Face config.json")
    _check_sizes(cfg, path)
    _check_given(cfg, path)
    spec = spec_from_config(model, json.dumps(cfg, sort_keys=True))
    folder = path.parent
    if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
        spec = dataclasses.replace(spec, weights_dir=str(folder))
    return spec


DEEP_LAYERS = 64
"""Deeper stacks are counted from two short ones (one and two periods of layer types) and extended."""

SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "head_dim", "max_position_embeddings")


def _check_sizes(cfg: dict, path) -> None:
    """The sizes a config gives (and its ``text_config``'s) are whole positive numbers, and the attention heads
    divide as transformers needs. Raises ConfigError naming the first that is not."""
    for part in (cfg, cfg.get("text_config")):
        if not isinstance(part, dict):
            continue
        for key in SIZE_KEYS:
            value = part.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{path}: {key} must be a whole number of at least 1, not {value!r}")
        heads, kv = part.get("num_attention_heads"), part.get("num_key_value_heads")
        if heads and kv and heads % kv:
            raise ConfigError(f"{path}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
        hidden = part.get("hidden_size")
        if heads and hidden and not part.get("head_dim") and hidden % heads:
            raise ConfigError(f"{path}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}), "
                              "or give head_dim")


GIVEN_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
"""Sizes a config must give (under its own name or the one its config class maps it to): transformers fills a
missing one with its class's default, which would size another model."""


SIZE_LIMITS = {"hidden_size": 1 << 20, "intermediate_size": 1 << 22, "num_hidden_layers": 1 << 16,
               "num_attention_heads": 1 << 14, "num_key_value_heads": 1 << 14, "vocab_size": 1 << 24}
"""Sizes past any model (the largest today are 16-64x below): a config past them is a typo, not a model to build."""


def _check_given(cfg: dict, path) -> None:
    """Raises ConfigError when the config (its ``text_config`` where it has one) leaves out one of ``GIVEN_KEYS``
    (transformers is imported only to look up the other names of a key that is not there under its own), or
    gives a size below 1 or past ``SIZE_LIMITS``."""
    part = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    for key, limit in SIZE_LIMITS.items():
        value = part.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and not 1 <= value <= limit:
            raise ConfigError(f"{path} gives {key} = {value:,}, outside 1..{limit:,}: check the config's sizes")
    if all(k in part for k in GIVEN_KEYS):
        return
    from transformers import CONFIG_MAPPING

    model_type = part.get("model_type", cfg["model_type"])
    try:
        aliases = dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {})
    except KeyError:
        return  # an unknown model type is refused where the model is built, with its own message
    missing = [k for k in GIVEN_KEYS if k not in part and aliases.get(k) not in part]
    if missing:
        raise ConfigError(f"{path} does not give {', '.join(missing)}; pass the model's full config.json")


SPEC_FORMAT = 7
"""Version of the cached spec files (``$MEMTUNE_CACHE/specs``); bump it when ``ModelSpec`` changes."""


@functools.lru_cache(maxsize=64)
def spec_from_config(name: str, config_json: str) -> ModelSpec:
    """The spec of a config: from the cache on disk (keyed by the config and the transformers version, which
    builds the model), else counted on the meta device (``_build_spec``) and stored there."""
    import hashlib
    from importlib.metadata import version

    from memtune.profiles import cache_root, write_cached

    key = hashlib.sha256(f"{SPEC_FORMAT}|{version('transformers')}|{config_json}".encode()).hexdigest()[:32]
    path = cache_root() / "specs" / f"{key}.json"
    try:
        fields = json.loads(path.read_text())
        return ModelSpec(name=name, config_json=config_json,
                         **{**fields, "linear_names": tuple(fields["linear_names"]),
                            "linear_shapes": tuple(tuple(x) for x in fields["linear_shapes"]),
                            "attention_linears": tuple(fields["attention_linears"])})
    except (OSError, ValueError, TypeError, KeyError):
        pass
    spec = _build_spec(name, config_json)
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name not in ("name", "config_json")}
    write_cached(path, fields)
    return spec


def _build_spec(name: str, config_json: str) -> ModelSpec:
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    cfg = json.loads(config_json)
    probe = ModelSpec(name=name, config_json=config_json, model_type=cfg["model_type"], num_layers=0, hidden_size=0,
                      intermediate_size=0, num_attention_heads=0, num_key_value_heads=0, head_dim=0, vocab_size=0,
                      tie_word_embeddings=False, max_position_embeddings=0, num_params=0, linear_names=())
    try:
        hf = probe.hf_config()
        depth = getattr(hf.get_text_config() if hasattr(hf, "get_text_config") else hf, "num_hidden_layers", 0) or 0
        period = probe.layer_period
        deep = depth > DEEP_LAYERS and depth % period == 0 and cfg.get("num_hidden_layers") == depth
        with torch.device("meta"):
            if deep:  # count two short stacks and extend: building thousands of layers takes minutes
                model = AutoModelForCausalLM.from_config(probe.hf_config(num_layers=2 * period))
                shorter = AutoModelForCausalLM.from_config(probe.hf_config(num_layers=period))
            else:
                model = AutoModelForCausalLM.from_config(hf)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises on this config (its field validation too)
        raise ConfigError(f"transformers cannot build a causal LM from {name}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    num_params = sum(p.numel() for p in model.parameters())
    if deep:
        per_period = num_params - sum(p.numel() for p in shorter.parameters())
        num_params += (depth // period - 2) * per_period
    layers = decoder_layers(model)
    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)})
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads

    def in_attention(parts: list[str]) -> bool:
        return any(part in ("self_attn", "attention", "attn", "self_attention") for part in parts)

    shapes: dict[str, list[int]] = {}
    attention = set()
    for layer in layers:
        for path, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                leaf = path.rsplit(".", 1)[-1]
                entry = shapes.setdefault(leaf, [module.in_features, 0])
                entry[1] += module.out_features
                if in_attention(path.split(".")):
                    attention.add(leaf)
    linear_shapes = tuple((leaf, i, round(o / len(layers))) for leaf, (i, o) in sorted(shapes.items()))
    stacked = sum(p.numel() for layer in layers for p in layer.parameters() if p.dim() == 3) // len(layers)
    norms = [m for m in layers[0].children() if "Norm" in type(m).__name__]
    attention_norms = 0  # query and key norms: over the projection, or per head (weights of head_dim elements)
    for path, module in layers[0].named_modules():
        weight = getattr(module, "weight", None)
        if "Norm" in type(module).__name__ and weight is not None and in_attention(path.split(".")[:-1]):
            per_head = weight.numel() == (getattr(text, "head_dim", None) or 0)
            attention_norms += weight.numel() * ((heads if path.rsplit(".", 1)[-1].startswith("q") else kv_heads)
                                                 if per_head else 1)
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    experts = text_cfg.get("num_local_experts") or text_cfg.get("num_experts") or 0
    top_k = text_cfg.get("num_experts_per_tok") or 0
    return ModelSpec(
        name=name,
        config_json=config_json,
        model_type=cfg["model_type"],
        num_layers=depth if deep else len(layers),
        hidden_size=text.hidden_size,
        intermediate_size=getattr(text, "intermediate_size", 4 * text.hidden_size),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab_size=text.vocab_size,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        max_position_embeddings=getattr(text, "max_position_embeddings", 0) or 0,
        num_params=num_params,
        linear_names=tuple(linear_names),
        linear_shapes=linear_shapes,
        attention_linears=tuple(sorted(attention)),
        norms_per_layer=len(norms),
        norm_upcast=not norms or any(not isinstance(m, nn.LayerNorm) for m in norms),
        expert_params=int(stacked),
        active_experts=min(1.0, top_k / experts) if experts and top_k and stacked else 1.0,
        experts=int(experts) if stacked else 0,
        experts_per_token=int(top_k) if stacked else 0,
        attention_norm_elements=attention_norms,
        period=period,
        hub_id=cfg.get("_name_or_path") or None,
    )


def decoder_layers(model):
    """The ``nn.ModuleList`` of decoder layers (the model's ``_no_split_modules`` blocks)."""
    from torch import nn

    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in block_names:
            return module
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module):
            return module
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}")


def default_lora_targets(spec: ModelSpec) -> tuple[str, ...]:
    """The LoRA targets a plan gets when none are given: peft's choice for the model type where the model has those
    layers (``q_proj, v_proj`` for Llama, ``query_key_value`` for GPT-NeoX), else every linear of the attention
    block (Phi-3: ``qkv_proj, o_proj``), else every linear of the layer."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    known = set(spec.linear_names)
    peft = PEFT_DEFAULTS.get(spec.model_type)
    if peft and set(peft) <= known:
        return tuple(peft)
    if {"q_proj", "v_proj"} <= known:
        return ("q_proj", "v_proj")
    return tuple(spec.attention_linears) or tuple(spec.linear_names)


def resolve_lora_targets(targets: tuple[str, ...], spec: ModelSpec) -> tuple[str, ...]:
    """``all-linear`` (peft's spelling) as the model's linear layer names; other targets as given."""
    if targets == ("all-linear",):
        return tuple(spec.linear_names)
    return targets
