"""Back-end stand-ins (bench.quant.standin): bit-exact against torchao, rounding cells, the QAT handle."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from bench.quant import QuantConfig
from bench.quant.config import QuantError
from bench.quant.standin import attach_standin, backend_scope, set_frozen, torchao_int8, torchao_int8_cells
from bench.registry import REGISTRY

INT8 = QuantConfig(bits=8)


def head_model(seed: int = 0) -> nn.Module:
    """A small pMoE whose head ``fc`` holds the cases torchao's rounding must get right."""
    torch.manual_seed(seed)
    model = REGISTRY.get("model", "pmoe").create(
        input_shape=(1, 16, 16), num_classes=10, mean=(0.3,), std=(0.3,), width=1, experts=2, topk=4
    )
    with torch.no_grad():
        w = model.fc.weight
        w.mul_(torch.rand_like(w) * 4)
        w[0, 0] = 0.75  # largest positive of its row: 127.5 steps, clamped to 127
        w[1, 1] = -0.8  # most negative of its row: -128 exactly
        w[2] = 0.0  # an all-zero row: scale is float32 eps
        w[3, 0], w[3, 1], w[3, 2] = 1.0, 0.5 / 127.5 * 1.0 * 3, 0.5 / 127.5 * 1.0 * 5  # ties near half-way
    return model.eval()


def test_torchao_int8_matches_quantize_bit_for_bit() -> None:
    torchao_quant = pytest.importorskip("torchao.quantization")
    model = head_model()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torchao_quant.quantize_(ref, torchao_quant.Int8WeightOnlyConfig())
    assert type(ref.moe.router.weight) is nn.Parameter  # Conv2d stays fp32: only nn.Linear is quantized
    q, scale = torchao_int8(model.fc.weight)
    assert torch.equal(q.to(torch.int8), ref.fc.weight.qdata)
    assert torch.equal(scale, ref.fc.weight.scale.reshape(scale.shape))
    handle = attach_standin(model, "torchao", INT8)
    x = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), rtol=0, atol=1e-5)
        with handle.fp32():
            assert not torch.allclose(model(x), ref(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("margin", [0.01, 0.05, 0.3])
def test_any_weight_inside_the_cells_quantizes_to_the_same_integers(margin: float) -> None:
    w = head_model().fc.weight.detach()
    lo, hi = torchao_int8_cells(w, margin)
    q, scale = torchao_int8(w)
    assert torch.all(lo <= hi)
    for seed in range(5):
        u = torch.rand(w.shape, generator=torch.Generator().manual_seed(seed))
        for moved in (lo + u * (hi - lo), lo, hi, torch.minimum(torch.maximum(w, lo), hi)):
            q2, scale2 = torchao_int8(moved)
            assert torch.equal(q2, q) and torch.equal(scale2, scale)


def test_handle_switches_precisions_and_gradients_go_straight_through() -> None:
    model = head_model()
    handle = attach_standin(model, "torchao", INT8)
    assert handle.names == ("fc.weight",) == tuple(backend_scope(head_model(), "torchao", INT8))
    master = model.fc.parametrizations.weight.original
    q, scale = torchao_int8(master)
    assert torch.equal(model.fc.weight, q * scale)
    with handle.fp32():
        assert torch.equal(model.fc.weight, master)
    model.fc.weight.sum().backward()
    assert torch.equal(master.grad, torch.ones_like(master))
    set_frozen(handle, True)
    assert not model.fc.weight.requires_grad
    with handle.at_bits(4), pytest.raises(QuantError, match="8 bits only"):
        _ = model.fc.weight
    keys = set(head_model().state_dict())
    handle.remove()
    assert set(model.state_dict()) == keys


def test_standin_refuses_other_bits_and_models_without_linear_layers() -> None:
    with pytest.raises(QuantError, match="8 bits only"):
        attach_standin(head_model(), "torchao", QuantConfig(bits=4))
    with pytest.raises(QuantError, match="nn.Linear"):
        attach_standin(nn.Sequential(nn.Conv2d(1, 2, 3)), "torchao", INT8)
