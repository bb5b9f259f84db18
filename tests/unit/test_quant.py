"""The k-bit stand-ins: LLM.int8's outlier columns at random init, and what it keeps for backward."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memtune.train import quant


@pytest.mark.parametrize("std", [0.9, 1.28])
def test_outlier_probability_matches_sampled_gated_products(std):
    # silu(g) * u with g, u ~ N(0, std^2): the share of elements of magnitude 6 or more, sampled
    rng = np.random.default_rng(0)
    g, u = rng.normal(0.0, std, (2, 4_000_000))
    sampled = np.mean(np.abs(g / (1 + np.exp(-g)) * u) >= quant.OUTLIER_THRESHOLD)
    assert quant.outlier_probability(std, "silu", gated=True) == pytest.approx(sampled, rel=0.1)
    # without the gate, silu(g) itself past 6 standard deviations of g / std: far rarer
    assert quant.outlier_probability(std, "silu", gated=False) < sampled / 100


def test_outlier_columns_grow_with_rows_up_to_every_column():
    p = 1e-3
    assert quant.outlier_columns(1, 8192, p) == round(8192 * p)
    assert quant.outlier_columns(1024, 8192, p) == round(8192 * (1 - (1 - p) ** 1024))
    assert quant.outlier_columns(100_000, 8192, p) == 8192
    assert quant.outlier_columns(4096, 8192, 0.0) == 0


def test_only_the_down_projection_of_a_gated_mlp_gets_outliers():
    class Config:
        hidden_size, intermediate_size, hidden_act, initializer_range = 64, 256, "silu", 0.2

    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(64, 256), nn.Linear(64, 256), nn.Linear(256, 64)
    down = quant.down_projection_outliers(Config, mlp, mlp.down_proj)
    assert down == pytest.approx(quant.outlier_probability(0.2 * math.sqrt(64), "silu", gated=True))
    assert quant.down_projection_outliers(Config, mlp, mlp.up_proj) == 0.0
    plain = nn.Module()  # fc2(act(fc1(x))): not gated
    plain.fc1, plain.fc2 = nn.Linear(64, 256), nn.Linear(256, 64)
    assert 0 <= quant.down_projection_outliers(Config, plain, plain.fc2) < down


def test_llm_int8_keeps_its_input_so_checkpointing_stops_recomputing_before_the_last_layer():
    # bitsandbytes keeps the input on the autograd context, not through save_for_backward: a checkpointed
    # block's recomputation stops after the last tensor saved the usual way (GELU's input), before the int8
    # layers that follow it
    def int8():
        return quant.EmulatedKbitLinear(nn.Linear(32, 32, bias=False), 8, torch.bfloat16)

    layers = nn.Sequential(int8(), nn.GELU(), int8(), int8())
    calls = []
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    with quant.kernel_notes(lambda kind, *_: calls.append(kind) if kind == "kbit" else None):
        out = checkpoint(layers, x, use_reentrant=False)
        assert calls.count("kbit") == 3
        out.float().sum().backward()
    assert calls.count("kbit") == 3 + 1
