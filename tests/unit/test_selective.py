"""Selective checkpointing keeps less and computes the same gradients as no checkpointing."""

import json

import pytest
import torch

from memtune.plan import Plan
from memtune.specs.model import spec_from_config
from memtune.train import recipe

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
              "head_dim": 16, "tie_word_embeddings": False}


def _grads(plan: Plan):
    spec = spec_from_config("tiny-llama", json.dumps(TINY_LLAMA, sort_keys=True))
    torch.manual_seed(0)
    model = recipe.build_model(spec, plan, device="cpu")
    with torch.no_grad():  # norms away from their all-ones init, so that their gradients are exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = recipe.make_batch(spec, plan, "cpu")
    with recipe.autocast(plan, "cpu"):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    names = (n.replace("._checkpoint_wrapped_module", "") for n, _ in model.named_parameters())
    return model, loss.item(), {n: p.grad.float() for n, (_, p) in zip(names, model.named_parameters())}


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-5), ("bf16", 1e-2), ("amp-bf16", 1e-2)])
def test_selective_checkpointing_gives_the_gradients_of_none(precision, tolerance):
    _, loss, want = _grads(Plan(precision=precision, batch_size=2, seq_len=16))
    model, got_loss, got = _grads(Plan(precision=precision, batch_size=2, seq_len=16, checkpointing="selective"))
    assert got_loss == loss
    for name, grad in want.items():
        assert (got[name] - grad).abs().max() <= tolerance * grad.abs().max(), name
    layer = model.model.layers[0]
    # the Llama RMSNorm has its gradient in closed form (no recomputed region); the SiLU MLP keeps gate and up
    # unless autocast casts inside it (amp without FSDP), where the region recomputes down(act(gate) * up)
    assert not getattr(layer.input_layernorm, recipe.RECOMPUTED, False)
    assert getattr(layer.mlp, recipe.RECOMPUTED, False) == precision.startswith("amp")


def test_the_closed_form_functions_keep_only_their_inputs():
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    norm_w = torch.nn.Parameter(torch.rand(64, dtype=torch.bfloat16))
    gate, up = (torch.randn(2, 8, 256, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    down_w = torch.nn.Parameter(torch.randn(64, 256, dtype=torch.bfloat16))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        recipe._RMSNorm.apply(x, norm_w, 1e-5)
        recipe._SiluGatedDown.apply(gate, up, down_w)
    assert [tuple(t.shape) for t in saved] == [(2, 8, 64), (64,), (2, 8, 1), (2, 8, 256), (2, 8, 256), (64, 256)]


def test_the_gated_product_gives_autograds_gradients_and_keeps_only_gate_and_up():
    gate, up = (torch.randn(2, 8, 32, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dh = torch.randn(2, 8, 32, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = recipe._SiluGated.apply(gate, up)
    assert [t is gate or t is up for t in saved] == [True, True]
    got = torch.autograd.grad(out, (gate, up), dh)
    want = torch.autograd.grad(torch.nn.functional.silu(gate) * up, (gate, up), dh)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize(("targets", "recomputed"), [(("q_proj", "v_proj"), False), (("down_proj",), True)])
def test_qlora_recomputes_the_mlp_tail_only_where_lora_trains_the_down_projection(targets, recomputed):
    # a frozen NF4 down projection keeps nothing of its input: the tail keeps gate and up and runs it once
    spec = spec_from_config("tiny-llama", json.dumps(TINY_LLAMA, sort_keys=True))
    plan = Plan(peft="lora", quantization="4bit", lora_targets=targets, checkpointing="selective")
    model = recipe.build_model(spec, plan, device="meta")
    mlp = model.base_model.model.model.layers[0].mlp
    assert getattr(mlp, recipe.RECOMPUTED, False) == recomputed
