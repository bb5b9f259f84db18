"""Selective checkpointing over bitsandbytes' real k-bit layers computes the gradients of no checkpointing (skipped
without CUDA or bitsandbytes)."""

import json

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; see bench/results/")]

LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 256,
         "head_dim": 64, "tie_word_embeddings": False}


def _lora_grads(quantization: str, checkpointing: str) -> tuple[float, dict]:
    from memtune.plan import Plan
    from memtune.specs.model import spec_from_config
    from memtune.train import recipe

    spec = spec_from_config("small-llama", json.dumps(LLAMA, sort_keys=True))
    plan = Plan(peft="lora", quantization=quantization, checkpointing=checkpointing, lora_dropout=0.0,
                batch_size=2, seq_len=64)
    torch.manual_seed(0)
    model = recipe.build_model(spec, plan, device="cuda")
    for name, p in model.named_parameters():  # LoRA's B starts at zero: give it a value, so A's gradient is not 0
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    loss = model(**recipe.make_batch(spec, plan, "cuda"), use_cache=False).loss
    loss.backward()
    return loss.item(), {n.replace("._checkpoint_wrapped_module", ""): p.grad.float()
                         for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_kbit_selective_checkpointing_gives_the_gradients_of_none(quantization):
    pytest.importorskip("bitsandbytes")
    loss, want = _lora_grads(quantization, "none")
    got_loss, got = _lora_grads(quantization, "selective")
    assert got_loss == pytest.approx(loss, rel=1e-3)
    assert want.keys() == got.keys() and want
    for name, grad in want.items():
        assert (got[name] - grad).abs().max() <= 2e-2 * grad.abs().max(), name
