"""A closed-form screen of a plan's peak memory, for searching thousands of plans in well under a second.

The trace (``memtune.estimate.compose``) is exact but costs 0.1-0.6 s per plan; the planner screens every
candidate with these formulas, then traces the cheapest ones in order until one is confirmed to fit. The screen
only has to be close enough not to discard a plan that fits: ``bench/screen.py`` measures it against the trace
(``bench/results/screen.json``), and the band around the usable memory inside which a plan is traced is set
from that, per class of plans (``screen_band``).

Per rank, with t = micro-batch x sequence tokens, L layers, h hidden, q = heads x head_dim, kv = kv-heads x head_dim,
i intermediate, V vocabulary, p the compute dtype's bytes, P the parameter count:

* Parameters: ``P x bytes(param dtype)`` (k-bit linears: NF4 0.5 B + 1/64 B absmax + double-quant constants;
  LLM.int8 1 B + fp32 row scale), divided by the shard degree under FSDP. LoRA adds ``r (in + out)`` per target.
* Gradients: trainable parameters in their dtype (sharded under FSDP); they live from the backward to the step.
* Optimizer states: AdamW ``2 x trainable x bytes`` (8-bit AdamW: 2 B + fp32 absmax per 256), sharded under FSDP,
  none of the three on the device with CPU offload. PyTorch's foreach step adds temporaries as large as one state (``_foreach_sqrt``
  of exp_avg_sq, then the division), fused AdamW none.
* Activations saved per layer and token, from what each op saves for backward (HF decoder layer: RMSNorm saves
  its fp32 input, and its output where its weight trains; a linear saves its input only where its weight trains,
  LoRA saves its fp32 dropout output and mask; SDPA saves q, k, v, output and log-sum-exp; eager attention
  ``2 x heads x s`` scores and probabilities; the gated MLP saves gate, activation and up outputs, and their
  product where down_proj trains). k-bit layers run attention in fp32 (peft upcasts the norms) and keep a
  dequantized copy of their input's dtype. Full checkpointing keeps one layer input per layer plus one layer's
  activations during its recompute; selective keeps what no checkpointing keeps, less the norms' fp32 upcasts
  (each norm keeps its input) and the MLP activation's tensors (the MLP keeps its input and its matmul outputs).
* Math SDPA and eager attention: CUDA's softmax backward adds a temporary as large as one layer's fp32 scores.
* Logits and loss: ``t V (p + 4 + 4)`` at the start of the backward (logits, fp32 upcast, log-softmax) plus the
  fp32 gradient of the log-softmax.
* FSDP2: two layers' unsharded parameters (the current one and the prefetched next) and the root (embeddings,
  lm_head) unsharded for the whole step; the reduce-scatter input of one layer's gradients in the backward.
* The caching allocator's cache: ``RESERVED_OVER_ALLOCATED`` of the peak, and under FSDP2 a share of the
  communication buffers for the blocks cached on its side streams (both fitted to the trace's allocator replay
  over the grid of ``bench/screen.py``), plus cuBLAS workspaces and the runtime overhead as in the trace.
"""

from __future__ import annotations

import functools
import json
import math

from memtune.estimate.breakdown import MemoryBreakdown
from memtune.estimate.categories import MemCategory as C
from memtune.estimate.categories import Verdict
from memtune.estimate.categories import Phase
from memtune.estimate.overhead import cublas_workspace_bytes, runtime_overhead_bytes
from memtune.plan import Plan
from memtune.specs.gpu import GpuSpec
from memtune.specs.model import ModelSpec

SCREEN_BAND = 0.25
"""How far the screen may be from the trace, either way, for a class of plans the grid of ``bench/screen.py`` does
not cover: a plan screened within this fraction of the usable memory is traced."""
BAND_MARGIN = 0.03
"""Added to the largest error measured in a class of plans (``screen_band``)."""
MIN_BAND = 0.10
"""The narrowest band either way: a class's grid has a few shapes only."""


def plan_class(plan: Plan) -> str:
    """The class by which the screen's error is measured: the kind of fine-tune and the checkpointing
    (``full-none``, ``lora-selective``, ``lora4bit-full``, ...); precision, sharding and offload vary within it."""
    kind = "full" if plan.peft == "none" else "lora" if plan.quantization == "none" else f"lora{plan.quantization}"
    return f"{kind}-{plan.checkpointing}"


@functools.cache
def _bands() -> dict[str, list[float]]:
    from memtune.profiles import profiles_dir

    try:
        bands = json.loads((profiles_dir() / "screen_bands.json").read_text())["bands"]
        return {str(k): [float(v[0]), float(v[1])] for k, v in bands.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}


def screen_band(plan: Plan) -> tuple[float, float]:
    """(under, over): how far below and above the trace the screen's requirement has been for plans of this class
    on the grid of ``bench/screen.py`` (``profiles/screen_bands.json``), each plus ``BAND_MARGIN`` and at least
    ``MIN_BAND``; ``SCREEN_BAND`` either way for a class the grid does not cover. A plan screened above
    ``usable x (1 + over)`` cannot fit; one below ``usable x (1 - under)`` fits."""
    band = _bands().get(plan_class(plan))
    if not band:
        return SCREEN_BAND, SCREEN_BAND
    return max(band[0] + BAND_MARGIN, MIN_BAND), max(band[1] + BAND_MARGIN, MIN_BAND)


# Reserved beyond allocated - a share of the peak, and under FSDP2 a multiple of its communication buffers (full
# fine-tune, LoRA) - fitted to the trace's allocator replay over the grid of ``bench/screen.py``.
RESERVED_OVER_ALLOCATED = 0.05
FSDP_CACHE_FULL, FSDP_CACHE_LORA = 1.6, 0.8

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "amp-bf16": 4, "amp-fp16": 4}


def layer_params(spec: ModelSpec) -> int:
    return sum(a * b for a, b in spec.layer_linears.values()) + 2 * spec.hidden_size


def lora_params(spec: ModelSpec, plan: Plan) -> int:
    if plan.peft != "lora":
        return 0
    dims = spec.layer_linears
    return spec.num_layers * sum(plan.lora_rank * (a + b) for name, (a, b) in dims.items() if name in plan.lora_targets)


def _quantized_bytes(n: int, quantization: str) -> float:
    if quantization == "4bit":
        return n * (0.5 + 1 / 64 + 4 / (64 * 256))
    return n * 1.0 + 4 * math.sqrt(n)  # int8 weight, fp32 scale per output row (rows ~ sqrt(n) for a square)


def static_bytes(spec: ModelSpec, plan: Plan) -> dict[C, float]:
    """Parameters, gradients and optimizer states per rank."""
    shard = plan.shard_degree
    pbytes = _BYTES[plan.precision]
    linears = spec.num_layers * sum(a * b for a, b in spec.layer_linears.values())
    other = spec.num_params - linears
    lora = lora_params(spec, plan)
    if plan.quantization != "none":
        # the remaining weights (embeddings, norms, lm_head) in the compute dtype, or fp32 after peft's k-bit
        # preparation (kbit_upcast); the adapters in fp32.
        params = _quantized_bytes(linears, plan.quantization) + other * (4 if plan.fp32_residual else 2) + lora * 4
    else:
        params = spec.num_params * pbytes + lora * pbytes
    trainable = lora if plan.peft == "lora" else spec.num_params
    tbytes = 4 if plan.quantization != "none" else pbytes
    grads = trainable * tbytes
    if plan.optimizer == "sgd":
        states = 0.0
    elif plan.optimizer == "adamw-8bit":
        states = trainable * (2 + 2 * 4 / 256)
        if plan.stack == "hf" and plan.peft == "none":  # the Trainer keeps fp32 states for the input embedding
            states += spec.vocab_size * spec.hidden_size * (8 - 2 - 2 * 4 / 256)
    else:
        states = 2 * trainable * tbytes
    if plan.offload:  # FSDP2's CPU offload keeps the sharded state on the host
        return {C.PARAMETERS: 0.0, C.GRADIENTS: 0.0, C.OPTIMIZER_STATES: 0.0}
    return {C.PARAMETERS: params / shard, C.GRADIENTS: grads / shard, C.OPTIMIZER_STATES: states / shard}


def attention_inputs(spec: ModelSpec) -> set[str]:
    """The attention projections that read the normalized hidden state (q, k, v; a fused qkv_proj; GPT-NeoX's
    query_key_value)."""
    h = spec.hidden_size
    names = {n for n in spec.attention_linears if spec.layer_linears[n][0] == h and spec.layer_linears[n][1] != h
             or n in ("q_proj", "k_proj", "v_proj")}
    return names or {"q_proj", "k_proj", "v_proj"}


def attention_output(spec: ModelSpec) -> str:
    """The attention's output projection (o_proj; GPT-NeoX's dense)."""
    q = spec.num_attention_heads * spec.head_dim
    return next((n for n in spec.attention_linears if spec.layer_linears[n] == (q, spec.hidden_size)
                 and n not in ("q_proj", "k_proj", "v_proj")), "o_proj")


def layer_activation_bytes(spec: ModelSpec, plan: Plan, tokens: int, backend: str = "flash") -> float:
    """Bytes one decoder layer saves for backward over ``tokens`` tokens, without checkpointing."""
    h, q, kv = spec.hidden_size, spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    kbit = plan.quantization != "none"
    p = 4 if plan.fp32_residual else 2  # k-bit plans with kbit_upcast run in fp32 (peft upcasts the norms)
    full = plan.peft == "none"
    lora = set(plan.lora_targets) if plan.peft == "lora" else set()
    dropout = plan.lora_dropout > 0
    dims = spec.layer_linears
    per_token = 0.0
    norms = spec.norms_per_layer or (4 if spec.model_type.startswith("gemma") else 2)
    upcast = 4 if spec.norm_upcast else p
    per_token += norms * upcast * h  # each norm's input (RMSNorm keeps its fp32 upcast)
    if full or kbit or (lora & attention_inputs(spec) and not dropout):
        per_token += norms * p * h  # norm outputs: inputs of trainable projections (and of the norm weights' grads)
    # query and key norms: their input's fp32 upcast, and their output where their weights train
    per_token += spec.attention_norm_elements * (upcast + (p if full else 0))
    # LoRA: dropout output and mask, and the adapter's rank-r output - in fp32, since peft keeps the adapters in
    # fp32 over half-precision weights (get_peft_model's autocast_adapter_dtype) and casts their input to it.
    for name in lora:
        per_token += ((4 + 1) * dims[name][0] if dropout else 0.0) + 4 * plan.lora_rank
    if backend in ("flash", "efficient"):
        per_token += p * (2 * q + 2 * kv) + 4 * spec.num_attention_heads  # q, k, v, output, log-sum-exp
    else:  # math kernel or eager: k and v repeated to every head, and the s x s probabilities
        per_token += p * 4 * q + (4 + (p if p < 4 else 0)) * spec.num_attention_heads * plan.seq_len
    if full or attention_output(spec) in lora and not dropout:
        per_token += p * q  # o_proj's input (the contiguous copy of the attention output)
    per_token += _mlp_bytes(spec, plan, p) + expert_activation_bytes(spec, plan, p)
    per_token += p * _int8_outlier_columns(spec, plan, tokens) if tokens else 0.0
    if plan.is_amp:
        per_token += 2 * 4 * h + 4 * (q + kv)  # fp32 residual stream: norm outputs and rotated q, k stay fp32
    return per_token * tokens


def _int8_outlier_columns(spec: ModelSpec, plan: Plan, tokens: int) -> float:
    """LLM.int8's down projection keeps its input's outlier columns for backward (``memtune.train.quant``): the
    expected count at random init over ``tokens`` rows, per token kept as a column each."""
    if plan.quantization != "8bit" or not spec.dense_mlp:
        return 0.0
    from memtune.train.quant import down_input_outlier_probability, outlier_columns

    probability = down_input_outlier_probability(spec.config, gated=spec.mlp_gated)
    return outlier_columns(tokens, spec.intermediate_size, probability)


def _int8_kept_inputs(spec: ModelSpec, plan: Plan, p: int) -> float:
    """Bytes per token and layer that LLM.int8 layers keep under full checkpointing: bitsandbytes keeps each
    layer's input on the autograd context, which checkpointing does not free - the attention's and the MLP's
    normalized inputs, the attention output and the down projection's input."""
    if plan.quantization != "8bit":
        return 0.0
    q = spec.num_attention_heads * spec.head_dim
    return p * (2 * spec.hidden_size + q + (spec.intermediate_size if spec.dense_mlp else 0))


def _mlp_bytes(spec: ModelSpec, plan: Plan, p: int) -> float:
    """Bytes a dense MLP saves per token without checkpointing. Gated: the gate output (the activation's input),
    the activation's output and the up output, and their product where the down projection trains; plain (GPT-NeoX):
    the activation's input, and its output where the last projection trains."""
    if not spec.dense_mlp:
        return 0.0
    i = spec.intermediate_size
    lora = set(plan.lora_targets) if plan.peft == "lora" else set()
    trains_last = plan.peft == "none" or spec.mlp_output_linear in lora and plan.lora_dropout <= 0
    return (3 if spec.mlp_gated else 1) * p * i + (p * i if trains_last else 0)


def expert_activation_bytes(spec: ModelSpec, plan: Plan, p: int) -> float:
    """Bytes a mixture-of-experts layer saves per token (transformers' grouped experts: each token's hidden state
    copied to each of its k experts, ``down(act(gate) * up)`` there, the outputs weighted by the router).

    Per routed copy: the gate and up outputs, the activation's output and the product fed to the down projection
    (``4 p i_e``: a grouped matmul keeps both operands whether or not its weights train) and the down projection's
    output, which the routing weights' gradient needs (``p h``); where the experts train, ``2 p h`` more (their
    input, and its copy in the expert's dtype). The router: its logits and probabilities in fp32, the chosen experts'
    indices and weights. Fitted on the trace of OLMoE-1B-7B at 4 x 2,048 tokens (full fine-tune 164 KB a token and
    layer against 159 traced, LoRA 98 against 97); ``bench/screen.py`` holds the other mixtures of experts."""
    if not spec.experts:
        return 0.0
    k, h, ie = spec.experts_per_token, spec.hidden_size, spec.expert_intermediate
    per_copy = 4 * p * ie + p * h + (2 * p * h if plan.peft == "none" else 0)
    return k * per_copy + 2 * 4 * spec.experts + k * (8 + 4)


def _checkpoint_bytes(spec: ModelSpec, plan: Plan, tokens: int, layer: float, backend: str) -> float:
    """What checkpointing keeps of the whole stack at the start of the backward."""
    p = 4 if plan.fp32_residual or plan.is_amp else 2
    L = spec.num_layers
    if plan.checkpointing == "full":  # each layer's input (and what LLM.int8 keeps of it)
        act = 4 if plan.fp32_residual else 2
        return L * (p * spec.hidden_size + _int8_kept_inputs(spec, plan, act)
                    + act * _int8_outlier_columns(spec, plan, tokens)) * tokens
    # selective (``recipe.checkpoint_layer``): each norm keeps its input instead of its fp32 upcast; the MLP keeps
    # its input and the gate and up projections' outputs instead of the activation's input, output and product (and
    # the down projection's LoRA tensors, recomputed with it); attention keeps what it keeps without checkpointing.
    h, i = spec.hidden_size, spec.intermediate_size
    kbit = plan.quantization != "none"
    act = 4 if plan.fp32_residual else 2
    lora = set(plan.lora_targets) if plan.peft == "lora" else set()
    dropout = plan.lora_dropout > 0
    norms = spec.norms_per_layer or (4 if spec.model_type.startswith("gemma") else 2)
    upcast = 4 if spec.norm_upcast else p
    norm_outputs_counted = plan.peft == "none" or kbit or (lora & attention_inputs(spec) and not dropout)
    per_token = layer / tokens - norms * upcast * h + norms * p * h
    if spec.dense_mlp:  # the MLP keeps its first projections' outputs (gate and up, or fc1) instead of what
        # the activation and the last projection keep
        per_token += (2 if spec.mlp_gated else 1) * act * i - _mlp_bytes(spec, plan, act)
    per_token += 0 if norm_outputs_counted else act * h
    per_token -= act * _int8_outlier_columns(spec, plan, tokens)  # the down projection runs in the recomputed region
    if spec.experts:  # op-level selective checkpointing there: the gate and up outputs kept (and, where the experts
        # train, the down projection's), the rest recomputed
        per_token -= expert_activation_bytes(spec, plan, act)
        per_token += spec.experts_per_token * (2 * act * spec.expert_intermediate
                                               + (act * h if plan.peft == "none" else 0))
    if spec.mlp_output_linear in lora:
        per_token -= ((4 + 1) * i if dropout else 0) + 4 * plan.lora_rank
    return L * per_token * tokens


def screen(spec: ModelSpec, plan: Plan, gpu: GpuSpec, *, margin: float = 0.02) -> MemoryBreakdown:
    """The closed-form breakdown of ``plan`` on ``gpu`` (see the module docstring); verdict without the replay."""
    from memtune.estimate.compose import sdpa_backend

    tokens = plan.batch_size * plan.seq_len
    static = static_bytes(spec, plan)
    backend = sdpa_backend(spec, plan, gpu)
    layer = layer_activation_bytes(spec, plan, tokens, backend)
    acts = (spec.num_layers * layer if plan.checkpointing == "none"
            else _checkpoint_bytes(spec, plan, tokens, layer, backend))
    wide = 4 if plan.fp32_residual else 2
    h, V = spec.hidden_size, spec.vocab_size
    acts += 2 * wide * h * tokens  # embedding output and the final norm's input
    if plan.is_amp:
        acts += spec.num_layers * layer_params(spec) * 2  # autocast's bf16/fp16 copies of the weights
    softcap = 4 if spec.config.get("final_logit_softcapping") else 0  # tanh's fp32 output
    logits = tokens * V * (12 + softcap)  # logits, fp32 log-softmax and the logits' gradient
    fsdp = 0.0
    if plan.sharding != "none" and (plan.shard_degree > 1 or plan.offload):
        pb = 2 if plan.precision != "fp32" else 4
        root = (spec.num_params - spec.num_layers * layer_params(spec)) * pb
        fsdp = root + 2 * layer_params(spec) * pb
        if plan.peft == "none":
            fsdp += layer_params(spec) * (4 if plan.is_amp else pb)
    comm = fsdp
    if fsdp and plan.sharding == "fsdp-grad-op":  # no resharding after the forward: every layer stays gathered
        fsdp += (spec.num_layers - 2) * layer_params(spec) * pb
    workspace = cublas_workspace_bytes(gpu.compute_capability)
    grads_in_backward = static[C.GRADIENTS] if plan.grad_accum > 1 else 0.0
    # A softmax over the scores (math SDPA, eager attention) is differentiated on CUDA through a temporary as
    # large as the fp32 scores (``memtune.estimate.trace.cuda_workspace_bytes``), one layer at a time.
    softmax_workspace = 4 * spec.num_attention_heads * plan.seq_len * tokens if backend in ("math", "eager") else 0
    backward = {C.PARAMETERS: static[C.PARAMETERS], C.GRADIENTS: grads_in_backward,
                C.OPTIMIZER_STATES: static[C.OPTIMIZER_STATES], C.ACTIVATIONS: acts, C.LOGITS: logits,
                C.TEMPORARIES: softmax_workspace, C.FSDP_BUFFERS: fsdp, C.WORKSPACE: workspace}
    temporaries = static[C.OPTIMIZER_STATES] / 2 if plan.optimizer == "adamw" and not plan.offload else 0.0
    step = {C.PARAMETERS: static[C.PARAMETERS], C.GRADIENTS: static[C.GRADIENTS],
            C.OPTIMIZER_STATES: static[C.OPTIMIZER_STATES], C.TEMPORARIES: temporaries,
            C.FSDP_BUFFERS: fsdp / 4, C.WORKSPACE: workspace}
    forward = {**backward, C.LOGITS: logits * 0.75}
    if plan.checkpointing != "none":
        # Later in the backward the logits are gone, the gradients grow, and one layer is recomputed at a time.
        recompute = {**backward, C.LOGITS: 0.0, C.GRADIENTS: static[C.GRADIENTS],
                     C.TEMPORARIES: 2 * layer + softmax_workspace}
        if sum(recompute.values()) > sum(backward.values()):
            backward = recompute
    phases = {ph: {c: int(v) for c, v in cats.items()} for ph, cats in
              ((Phase.FORWARD, forward), (Phase.BACKWARD, backward), (Phase.OPTIMIZER_STEP, step))}
    peak = max(sum(v.values()) for v in phases.values())
    # FSDP2's all-gather and reduce-scatter streams keep their own cached blocks, about as large as the gathered
    # parameters (and gradients) they carry.
    stream_cache = comm * (FSDP_CACHE_FULL if plan.peft == "none" else FSDP_CACHE_LORA)
    reserved = int(peak * (1 + RESERVED_OVER_ALLOCATED) + stream_cache)
    overhead = runtime_overhead_bytes(plan.has_process_group)
    margin_bytes = int(gpu.memory_bytes * margin)
    usable = gpu.memory_bytes - margin_bytes
    need = reserved + overhead
    verdict = Verdict.FITS if need <= usable else Verdict.DOES_NOT_FIT
    return MemoryBreakdown(model=spec.name, gpu=gpu.name, plan=plan, phases=phases, peak_reserved_bytes=reserved,
                           gpu_reserved_bytes=reserved if need <= gpu.memory_bytes else None,
                           runtime_overhead_bytes=overhead, device_usable_bytes=gpu.memory_bytes,
                           margin_bytes=margin_bytes, verdict=verdict,
                           verdict_reason="closed-form screen, not traced", method="screen")
