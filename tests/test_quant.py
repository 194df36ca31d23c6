"""Tests for bench.quant: Eq. 2 fake quantization, configs, scopes, PTQ and QAT."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bench.errors import BenchError
from bench.models.base import BenchModel, Normalize, Routing
from bench.quant import (
    QuantConfig,
    QuantError,
    attach_qat,
    fake_quantize,
    fake_quantized_forward,
    qat,
    quantization_levels,
    quantize_copy,
    quantized,
    scope_parameters,
)

FAST = settings(max_examples=40, deadline=None)

# ---------------------------------------------------------------------------------------------- models


class TinyMoE(BenchModel):
    """A miniature patch-level MoE: conv backbone, linear router over 1-pixel patches, conv experts."""

    patch_grid = (4, 4)
    patch_px = (1, 1)

    def __init__(self, experts: int = 2, k: int = 3) -> None:
        super().__init__()
        self.norm = Normalize((0.5,), (0.25,))
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.router = nn.Linear(4, experts)
        self.experts = nn.ModuleList([nn.Conv2d(4, 3, 1) for _ in range(experts)])
        self.head = nn.Linear(3, 5)
        self.k = k

    def forward_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        h = F.relu(self.bn(self.stem(self.norm(x))))
        tokens = h.flatten(2).transpose(1, 2)  # [N, n, d]
        scores = self.router(tokens)  # [N, n, E]
        top = scores.topk(self.k, dim=1)
        gates = top.values.softmax(dim=1)  # [N, k, E]
        out = torch.zeros(x.shape[0], 3)
        for e, expert in enumerate(self.experts):
            idx = top.indices[:, :, e].unsqueeze(-1).expand(-1, -1, tokens.shape[2])
            picked = tokens.gather(1, idx).transpose(1, 2).unsqueeze(-1)  # [N, d, k, 1]
            y = F.relu(expert(picked)).squeeze(-1)  # [N, 3, k]
            out = out + (y * gates[:, :, e].unsqueeze(1)).sum(-1)
        routing = Routing(
            indices=top.indices.transpose(1, 2),
            gates=gates.transpose(1, 2),
            scores=scores.transpose(1, 2),
            grid=(4, 4),
            patch_px=(1, 1),
        )
        return self.head(out), routing

    def parameter_groups(self) -> dict[str, list[str]]:
        experts = [f"experts.{i}.{p}" for i in range(len(self.experts)) for p in ("weight", "bias")]
        return {"gate": ["router.weight", "router.bias"], "experts": experts}


class Dense(BenchModel):
    """A dense model: no parameter groups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(8, 3)

    def forward_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.fc(self.conv(x).flatten(1)), None


class RawGate(BenchModel):
    """Router kernel as a raw parameter on the model itself (w_s in R^d per expert, stacked)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_w = nn.Parameter(torch.randn(3, 4))
        self.fc = nn.Linear(3, 2)

    def forward_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.fc(x @ self.gate_w.T), None

    def parameter_groups(self) -> dict[str, list[str]]:
        return {"gate": ["gate_w"], "experts": ["fc.weight"]}


def tiny(seed: int = 0) -> TinyMoE:
    torch.manual_seed(seed)
    model = TinyMoE()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode is not an identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------- Eq. 2, hand values


def test_hand_computed_two_bits() -> None:
    # s = 1/3; (z - 0)/s = [0, 0.3, 1.2, 3] -> levels [0, 0, 1, 3]
    out = fake_quantize(torch.tensor([0.0, 0.1, 0.4, 1.0]), 2)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 1 / 3, 1.0]))
    # 0.5 / (1/3) = 1.5 is a tie; torch.round rounds half to even -> level 2
    out = fake_quantize(torch.tensor([0.0, 0.1, 0.5, 1.0]), 2)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 2 / 3, 1.0]))


def test_hand_computed_offset_range() -> None:
    # z_min = -1, z_max = 2, B = 2: s = 1; levels at -1, 0, 1, 2
    out = fake_quantize(torch.tensor([-1.0, -0.6, 0.2, 0.7, 2.0]), 2)
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0, 0.0, 1.0, 2.0]))


def test_hand_computed_symmetric() -> None:
    # B = 3: levels -3..3, s = max|z| / 3 = 1/3
    out = fake_quantize(torch.tensor([-1.0, -0.2, 0.0, 0.3, 0.6]), 3, symmetric=True)
    torch.testing.assert_close(out, torch.tensor([-1.0, -1 / 3, 0.0, 1 / 3, 2 / 3]))


def test_hand_computed_per_channel() -> None:
    z = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.1, 0.4, 1.0], [5.0, 5.0, 5.0, 5.0]])
    out = fake_quantize(z, 2, granularity="channel")
    expected = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 1 / 3, 1.0], [5.0, 5.0, 5.0, 5.0]])
    torch.testing.assert_close(out, expected)
    # per tensor the small row collapses onto the coarse grid of the large one
    assert fake_quantize(z, 2)[1].unique().numel() < 3


# ------------------------------------------------------------------------ agreement with PyTorch ops


def _grid_tensor(data: st.DataObject, top_level: int, low: int) -> tuple[torch.Tensor, float]:
    """Values (k + u) * s with k in [low, low + top_level] and |u| <= 0.4, both ends present exactly."""
    scale = data.draw(st.floats(0.01, 10.0))
    n = data.draw(st.integers(1, 30))
    ks = data.draw(st.lists(st.integers(low, low + top_level), min_size=n, max_size=n))
    us = data.draw(st.lists(st.floats(-0.4, 0.4), min_size=n, max_size=n))
    high = low + top_level
    us = [abs(u) if k == low else -abs(u) if k == high else u for k, u in zip(ks, us, strict=True)]
    vals = [low * scale, high * scale] + [(k + u) * scale for k, u in zip(ks, us, strict=True)]
    return torch.tensor(vals, dtype=torch.float32), scale


@FAST
@given(data=st.data(), bits=st.integers(2, 8))
def test_matches_torch_per_tensor_affine(data: st.DataObject, bits: int) -> None:
    top = 2**bits - 1
    zero_point = data.draw(st.integers(0, top))  # integer zero point: z_min / s is an integer
    z, scale = _grid_tensor(data, top, -zero_point)
    ours = fake_quantize(z, bits)
    theirs = torch.fake_quantize_per_tensor_affine(z, scale, zero_point, 0, top)
    torch.testing.assert_close(ours, theirs, atol=1e-5 * scale * top, rtol=1e-5)


@FAST
@given(data=st.data(), bits=st.integers(2, 8))
def test_matches_torch_symmetric(data: st.DataObject, bits: int) -> None:
    top = 2 ** (bits - 1) - 1
    z, scale = _grid_tensor(data, 2 * top, -top)
    ours = fake_quantize(z, bits, symmetric=True)
    theirs = torch.fake_quantize_per_tensor_affine(z, scale, 0, -top, top)
    torch.testing.assert_close(ours, theirs, atol=1e-5 * scale * top, rtol=1e-5)


@FAST
@given(data=st.data(), bits=st.integers(2, 8), rows=st.integers(1, 4))
def test_matches_torch_per_channel_affine(data: st.DataObject, bits: int, rows: int) -> None:
    top = 2**bits - 1
    zps = [data.draw(st.integers(0, top)) for _ in range(rows)]
    grids = [_grid_tensor(data, top, -zp) for zp in zps]
    width = max(len(g[0]) for g in grids)
    # pad each row by repeating its own values so every row keeps its range
    z = torch.stack([g[0].repeat(math.ceil(width / len(g[0])))[:width] for g in grids])
    scales = torch.tensor([g[1] for g in grids], dtype=torch.float32)
    ours = fake_quantize(z, bits, granularity="channel")
    theirs = torch.fake_quantize_per_channel_affine(
        z, scales, torch.tensor(zps, dtype=torch.int32), 0, 0, top
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5 * float(scales.max()) * top, rtol=1e-5)


# ------------------------------------------------------------------------------------------ properties

finite = st.floats(-100.0, 100.0, allow_nan=False, allow_subnormal=False, width=32)
vectors = st.lists(finite, min_size=1, max_size=40)


@FAST
@given(values=vectors, bits=st.integers(2, 8), symmetric=st.booleans())
def test_distinct_values_bounded(values: list[float], bits: int, symmetric: bool) -> None:
    out = fake_quantize(torch.tensor(values), bits, symmetric=symmetric)
    assert out.unique().numel() <= quantization_levels(bits, symmetric)


@FAST
@given(values=vectors, bits=st.integers(2, 8))
def test_range_kept_and_min_exact(values: list[float], bits: int) -> None:
    z = torch.tensor(values)
    out = fake_quantize(z, bits)
    assert out.min() == z.min()
    span = float(z.max() - z.min())
    assert float(out.max()) <= float(z.max()) + 1e-5 * span + 1e-6


@FAST
@given(values=vectors, bits=st.integers(2, 8), symmetric=st.booleans(), channel=st.booleans())
def test_idempotent(values: list[float], bits: int, symmetric: bool, channel: bool) -> None:
    z = torch.tensor(values).view(1, -1).repeat(2, 1) * torch.tensor([[1.0], [0.5]])
    gran = "channel" if channel else "tensor"
    once = fake_quantize(z, bits, gran, symmetric)
    twice = fake_quantize(once, bits, gran, symmetric)
    step = float(z.abs().max()) / 2 ** (bits - 1)
    torch.testing.assert_close(twice, once, atol=1e-4 * step + 1e-6, rtol=1e-5)


@FAST
@given(
    values=st.lists(st.lists(finite, min_size=5, max_size=5), min_size=1, max_size=4),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
)
def test_per_channel_is_per_row(values: list[list[float]], bits: int, symmetric: bool) -> None:
    z = torch.tensor(values)
    out = fake_quantize(z, bits, "channel", symmetric)
    for row, qrow in zip(z, out, strict=True):
        assert torch.equal(qrow, fake_quantize(row, bits, "tensor", symmetric))


@FAST
@given(values=vectors, bits=st.integers(2, 8))
def test_symmetric_zero_exact_and_odd(values: list[float], bits: int) -> None:
    z = torch.tensor([*values, 0.0])
    out = fake_quantize(z, bits, symmetric=True)
    assert out[-1] == 0.0
    assert torch.equal(fake_quantize(-z, bits, symmetric=True), -out)


def test_per_channel_4d_kernel_uses_dim0() -> None:
    w = torch.randn(3, 2, 3, 3) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1, 1)
    out = fake_quantize(w, 3, "channel")
    for i in range(3):
        assert torch.equal(out[i], fake_quantize(w[i], 3))
        assert out[i].unique().numel() <= 8


def test_per_channel_on_vector_is_per_tensor() -> None:
    z = torch.tensor([0.0, 0.1, 0.4, 1.0])
    assert torch.equal(fake_quantize(z, 2, "channel"), fake_quantize(z, 2))


def test_degenerate_unchanged() -> None:
    const = torch.full((3, 4), 0.7)
    assert torch.equal(fake_quantize(const, 4), const)
    assert torch.equal(fake_quantize(const, 4, "channel"), const)
    assert torch.equal(fake_quantize(const, 4, symmetric=True), const)
    zeros = torch.zeros(5)
    assert torch.equal(fake_quantize(zeros, 2, symmetric=True), zeros)


def test_fp32_is_identity() -> None:
    z = torch.randn(4, 4)
    assert fake_quantize(z, None) is z
    assert fake_quantize(z, 32) is z
    assert not torch.equal(fake_quantize(z, 8), z)


def test_sixteen_bits_nearly_identity() -> None:
    z = torch.randn(100, dtype=torch.float64)
    out = fake_quantize(z, 16)
    step = float(z.max() - z.min()) / (2**16 - 1)
    assert float((out - z).abs().max()) <= step / 2 + 1e-12
    assert out.dtype == torch.float64


def test_half_precision_keeps_dtype() -> None:
    z = torch.randn(16).to(torch.bfloat16)
    out = fake_quantize(z, 4)
    assert out.dtype == torch.bfloat16
    assert out.float().unique().numel() <= 16


@pytest.mark.parametrize("bits", [0, 1, 17, 31, 64, True, 4.0, "4"])
def test_bad_bits_rejected(bits: object) -> None:
    with pytest.raises(QuantError, match="bits"):
        fake_quantize(torch.randn(3), bits)  # type: ignore[arg-type]


def test_bad_granularity_rejected() -> None:
    with pytest.raises(QuantError, match="granularity.*tensor, channel.*'row'"):
        fake_quantize(torch.randn(3), 4, "row")


def test_quant_error_is_bench_error() -> None:
    assert issubclass(QuantError, BenchError)


# ------------------------------------------------------------------------------------------------ STE


@pytest.mark.parametrize(
    ("granularity", "symmetric"), [("tensor", False), ("channel", False), ("tensor", True), ("channel", True)]
)
def test_straight_through_gradient(granularity: str, symmetric: bool) -> None:
    z = torch.randn(3, 5, requires_grad=True)
    upstream = torch.randn(3, 5)
    out = fake_quantize(z, 3, granularity, symmetric)
    (grad,) = torch.autograd.grad(out, z, upstream)
    assert torch.equal(grad, upstream)


def test_gradient_through_composite_loss() -> None:
    z = torch.randn(10, requires_grad=True)
    q = fake_quantize(z, 2)
    (q**2).sum().backward()
    assert torch.equal(z.grad, 2 * q.detach())


# ---------------------------------------------------------------------------------------------- config


def test_config_labels() -> None:
    assert QuantConfig().label == "fp32"
    assert QuantConfig(bits=4).label == "int4/whole"
    assert QuantConfig(bits=4, scope="gate", granularity="channel", symmetric=True).label == (
        "int4/gate/channel/sym"
    )
    assert QuantConfig(bits=8, scope="experts", activations=True).label == "int8/experts/act"
    assert str(QuantConfig(bits=2)) == "int2/whole"


def test_config_hashable_and_fp32_canonical() -> None:
    a = QuantConfig(bits=4, scope="gate")
    assert a == QuantConfig(bits=4, scope="gate") and hash(a) == hash(QuantConfig(bits=4, scope="gate"))
    assert a != QuantConfig(bits=4, scope="experts")
    fp32s = {QuantConfig(), QuantConfig(bits=32), QuantConfig(bits=None, scope="gate", symmetric=True)}
    assert fp32s == {QuantConfig()}
    assert QuantConfig(bits=32).bits is None and QuantConfig().is_fp32


def test_config_frozen() -> None:
    cfg = QuantConfig(bits=4)
    with pytest.raises(Exception, match="frozen"):
        cfg.bits = 8  # type: ignore[misc]


@FAST
@given(
    bits=st.sampled_from([None, 2, 3, 4, 6, 8, 16]),
    scope=st.sampled_from(["gate", "experts", "whole"]),
    granularity=st.sampled_from(["tensor", "channel"]),
    symmetric=st.booleans(),
    activations=st.booleans(),
)
def test_config_round_trip(
    bits: int | None, scope: str, granularity: str, symmetric: bool, activations: bool
) -> None:
    cfg = QuantConfig(
        bits=bits, scope=scope, granularity=granularity, symmetric=symmetric, activations=activations
    )
    again = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.label == cfg.label


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"bits": 1}, r"quant\.bits: .*2\.\.16.*got 1"),
        ({"bits": 4, "scope": "router"}, r"quant\.scope: .*'gate', 'experts' or 'whole'.*got 'router'"),
        ({"bits": 4, "scoep": "gate"}, r"quant\.scoep: unknown field; allowed: bits, scope"),
        ({"bits": None, "scope": "router"}, r"quant\.scope"),
        ({"bits": 4, "granularity": "row"}, r"quant\.granularity"),
    ],
)
def test_config_errors_name_the_field(data: dict[str, object], pattern: str) -> None:
    with pytest.raises(QuantError, match=pattern):
        QuantConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------- scopes

WEIGHTS = {
    "gate": ["router.weight"],
    "experts": ["experts.0.weight", "experts.1.weight"],
    "whole": ["stem.weight", "router.weight", "experts.0.weight", "experts.1.weight", "head.weight"],
}


@pytest.mark.parametrize("scope", ["gate", "experts", "whole"])
def test_scope_parameters(scope: str) -> None:
    assert scope_parameters(tiny(), scope) == WEIGHTS[scope]


@pytest.mark.parametrize("scope", ["gate", "experts", "whole"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_ptq_touches_exactly_the_scope(scope: str, granularity: str) -> None:
    model = tiny()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with quantized(model, QuantConfig(bits=2, scope=scope, granularity=granularity)):
        changed = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
        assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())
    assert changed == set(WEIGHTS[scope])


def test_dense_model_needs_whole_scope() -> None:
    for scope in ("gate", "experts"):
        with pytest.raises(QuantError, match=f"'{scope}' needs a Mixture-of-Experts.*Dense.*'whole'"):
            scope_parameters(Dense(), scope)
    assert scope_parameters(Dense(), "whole") == ["conv.weight", "fc.weight"]


def test_plain_module_whole_scope() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 1))
    assert scope_parameters(net, "whole") == ["0.weight", "2.weight"]
    with pytest.raises(QuantError, match="Mixture-of-Experts"):
        scope_parameters(net, "gate")


def test_bad_scope_and_bad_groups() -> None:
    with pytest.raises(QuantError, match="scope: must be one of gate, experts, whole, got 'all'"):
        scope_parameters(tiny(), "all")

    class Broken(TinyMoE):
        def parameter_groups(self) -> dict[str, list[str]]:
            return {"gate": ["rooter.weight"], "experts": ["experts.0.bias"]}

    with pytest.raises(QuantError, match="names 'rooter.weight'"):
        scope_parameters(Broken(), "gate")
    with pytest.raises(QuantError, match="only biases"):
        scope_parameters(Broken(), "experts")


# ------------------------------------------------------------------------------------------------- PTQ


def test_ptq_restores_bit_exactly_and_never_trains() -> None:
    model = tiny()
    model.stem.weight.requires_grad_(False)
    before = snapshot(model)
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    ids = {k: id(p) for k, p in model.named_parameters()}
    x = images()
    fp32_out = model(x).detach()
    with quantized(model, QuantConfig(bits=2)) as m:
        assert m is model
        q_out = model(x).detach()
    assert not torch.equal(q_out, fp32_out)
    after = snapshot(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert {k: id(p) for k, p in model.named_parameters()} == ids
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert torch.equal(model(x), fp32_out)


def test_ptq_restores_after_exception() -> None:
    model = tiny()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), quantized(model, QuantConfig(bits=3, activations=True)):
        assert not torch.equal(model.router.weight, before["router.weight"])
        raise RuntimeError("boom")
    after = snapshot(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(not m._forward_hooks for m in model.modules())


def test_ptq_fp32_leaves_model_alone() -> None:
    model = tiny()
    x = images()
    out = model(x)
    with quantized(model, QuantConfig(bits=None)):
        assert torch.equal(model(x), out)


def test_ptq_scope_error_leaves_model_alone() -> None:
    model = Dense()
    before = snapshot(model)
    with pytest.raises(QuantError), quantized(model, QuantConfig(bits=4, scope="gate")):
        pass
    assert all(torch.equal(snapshot(model)[k], v) for k, v in before.items())


def test_quantize_copy() -> None:
    model = tiny()
    before = snapshot(model)
    cfg = QuantConfig(bits=3, scope="experts", granularity="channel")
    copy = quantize_copy(model, cfg)
    assert copy is not model
    assert all(torch.equal(snapshot(model)[k], v) for k, v in before.items())
    for name, p in copy.named_parameters():
        expected = fake_quantize(before[name], 3, "channel") if name in WEIGHTS["experts"] else before[name]
        assert torch.equal(p, expected), name
    x = images()
    with quantized(model, cfg):
        assert torch.equal(copy(x), model(x))


def test_activation_quantization_hooks() -> None:
    model = tiny()
    seen: list[torch.Tensor] = []
    cfg = QuantConfig(bits=2, scope="gate", activations=True)
    with quantized(model, cfg):
        model.router.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
        model(images())
    assert seen[0].unique().numel() <= 4
    seen.clear()
    model(images())  # our hook is gone, the capture hook still runs
    assert seen[0].unique().numel() > 4


def test_activation_hooks_sit_on_the_modules_that_own_in_scope_weights_per_tensor() -> None:
    """Whole scope hooks stem, router, each expert and head (never the root); a per-channel config still
    quantizes activations per tensor (dim 0 of an activation is the batch, not a channel)."""
    cfg = QuantConfig(bits=2, scope="whole", granularity="channel", activations=True)
    copy = quantize_copy(tiny(), cfg)
    hooked = {name for name, m in copy.named_modules() if m._forward_hooks}
    assert hooked == {"stem", "router", "experts.0", "experts.1", "head"}
    seen: list[torch.Tensor] = []
    copy.router.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    copy(images())
    assert seen[0].unique().numel() <= 4  # one 2-bit grid for the whole batch


def test_activation_hooks_are_removed_when_registration_fails_part_way(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny()
    calls = {"n": 0}
    original = nn.Module.register_forward_hook

    def flaky(self: nn.Module, hook: object, *args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return original(self, hook, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "register_forward_hook", flaky)
    with pytest.raises(RuntimeError, match="boom"), quantized(model, QuantConfig(bits=2, activations=True)):
        pass
    assert not any(m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------------- QAT


def test_qat_forward_equals_ptq_and_grads_reach_masters() -> None:
    cfg = QuantConfig(bits=3, scope="whole", granularity="channel")
    model = tiny()
    x, y = images(), torch.tensor([0, 1, 2, 3, 4, 0])
    reference = quantize_copy(model, cfg)
    F.cross_entropy(reference(x), y).backward()
    with qat(model, cfg) as handle:
        assert handle.names == tuple(WEIGHTS["whole"])
        out = model(x)
        assert torch.equal(out, reference(x))
        F.cross_entropy(out, y).backward()
        master = model.router.parametrizations.weight.original
        assert master.grad is not None
    # straight-through: dL/dtheta == dL/dQ(theta), which is the gradient the quantized copy gets
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference.get_parameter(name).grad, rtol=1e-6, atol=1e-7)


def test_qat_with_activations_passes_gradients_straight_through() -> None:
    """Activation rounding is straight-through too: every in-scope weight, the first layer's included, gets
    the gradient of the quantized copy (a hook that detached or rounded without STE would zero them)."""
    cfg = QuantConfig(bits=4, scope="whole", activations=True)
    model = tiny()
    x, y = images(), torch.tensor([0, 1, 2, 3, 4, 0])
    reference = quantize_copy(model, cfg)
    F.cross_entropy(reference(x), y).backward()
    with qat(model, cfg):
        out = model(x)
        assert torch.equal(out, reference(x))
        F.cross_entropy(out, y).backward()
    for name in WEIGHTS["whole"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, reference.get_parameter(name).grad, rtol=1e-6, atol=1e-7)


def test_qat_optimizer_updates_fp32_masters_and_removes_cleanly() -> None:
    model = tiny()
    params_before = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before attaching
    cfg = QuantConfig(bits=2, scope="gate")
    x, y = images(), torch.tensor([0, 1, 2, 3, 4, 0])
    start = model.router.weight.detach().clone()
    with qat(model, cfg):
        assert type(model.router).__name__ == "ParametrizedLinear"
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert type(model.router) is nn.Linear
    assert not hasattr(model.router, "parametrizations")
    assert dict(model.named_parameters()) == params_before  # same names, same Parameter objects
    w = model.router.weight
    expected = start - 0.1 * w.grad
    torch.testing.assert_close(w.detach(), expected)
    assert w.unique().numel() > 4  # the master stayed full precision
    assert isinstance(w, nn.Parameter) and w.requires_grad


def test_qat_toggles_for_a_qcb_step() -> None:
    cfg = QuantConfig(bits=8, scope="gate", granularity="channel")
    model = tiny()
    x = images()
    plain = model(x).detach()
    with quantized(model, cfg):
        at8 = model(x).detach()
    with quantized(model, QuantConfig(bits=2, scope="gate", granularity="channel")):
        at2 = model(x).detach()
    with qat(model, cfg) as handle:
        assert torch.equal(model(x), at8)
        with handle.fp32():
            assert torch.equal(model(x), plain)
        with handle.at_bits(2):
            assert torch.equal(model(x), at2)
            with handle.fp32():
                assert torch.equal(model(x), plain)
            assert handle.bits == 2
        assert handle.bits == 8 and handle.enabled
        assert torch.equal(model(x), at8)


def test_qcb_objective_gradient_is_sum_of_terms() -> None:
    cfg = QuantConfig(bits=4, scope="whole")
    x, y, yt = images(), torch.tensor([0, 1, 2, 3, 4, 0]), torch.zeros(6, dtype=torch.long)
    model = tiny()

    def grads_of(net: nn.Module, target: torch.Tensor) -> dict[str, torch.Tensor]:
        net.zero_grad()
        F.cross_entropy(net(x), target).backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    g_clean = grads_of(quantize_copy(model, cfg), y)
    g_bd = grads_of(quantize_copy(model, QuantConfig(bits=2)), yt)
    g_fp = grads_of(tiny(), y)
    with qat(model, cfg) as handle:
        loss = F.cross_entropy(model(x), y)
        with handle.at_bits(2):
            loss = loss + 0.5 * F.cross_entropy(model(x), yt)
        with handle.fp32():
            loss = loss + 0.25 * F.cross_entropy(model(x), y)
        loss.backward()
    for name, p in model.named_parameters():
        expected = g_clean[name] + 0.5 * g_bd[name] + 0.25 * g_fp[name]
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)


def test_fake_quantized_forward_matches_ptq_without_touching_model() -> None:
    cfg = QuantConfig(bits=3, scope="experts", symmetric=True)
    model = tiny()
    before = snapshot(model)
    x, y = images(), torch.tensor([0, 1, 2, 3, 4, 0])
    out = fake_quantized_forward(model, cfg, x)
    assert all(torch.equal(snapshot(model)[k], v) for k, v in before.items())
    with quantized(model, cfg):
        assert torch.equal(out, model(x))
    F.cross_entropy(out, y).backward()
    reference = tiny()
    with qat(reference, cfg):
        F.cross_entropy(reference(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference.get_parameter(name).grad)
    assert torch.equal(fake_quantized_forward(model, QuantConfig(), x), model(x))


def test_qat_on_raw_parameter_of_the_model() -> None:
    model = RawGate()
    cls = type(model)
    gate = model.gate_w
    x = torch.randn(5, 4)
    cfg = QuantConfig(bits=2, scope="gate", granularity="channel")
    expected = quantize_copy(model, cfg)(x)
    handle = attach_qat(model, cfg)
    assert torch.equal(model(x), expected)
    handle.remove()
    handle.remove()  # idempotent
    assert type(model) is cls and model.gate_w is gate
    assert isinstance(model, BenchModel)


def test_qat_refuses_double_attach_and_ptq_while_attached() -> None:
    model = tiny()
    with qat(model, QuantConfig(bits=4, scope="gate")):
        with pytest.raises(QuantError, match="parametrized"):
            attach_qat(model, QuantConfig(bits=4, scope="gate"))
        with pytest.raises(QuantError, match="parametrized"):
            attach_qat(model, QuantConfig(bits=4, scope="whole"))
        with pytest.raises(QuantError, match="parametrized"), quantized(model, QuantConfig(bits=4)):
            pass
        assert type(model.experts[0]) is nn.Conv2d  # the refused attach left nothing behind


def test_qat_handle_misuse() -> None:
    model = tiny()
    handle = attach_qat(model, QuantConfig(bits=4, scope="gate"))
    with pytest.raises(QuantError, match="bits"):
        handle.bits = 1
    handle.remove()
    assert not handle.attached
    with pytest.raises(QuantError, match="removed"):
        handle.bits = 8
    empty = attach_qat(model, QuantConfig())
    assert empty.names == ()
    with empty.fp32():
        pass
    with pytest.raises(QuantError, match="quantizes nothing"), empty.at_bits(4):
        pass


def test_qat_activation_hooks_follow_toggles_and_are_removed() -> None:
    model = tiny()
    seen: list[torch.Tensor] = []
    with qat(model, QuantConfig(bits=2, scope="gate", activations=True)) as handle:
        model.router.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
        model(images())
        with handle.fp32():
            model(images())
    model(images())
    assert seen[0].unique().numel() <= 4
    assert seen[1].unique().numel() > 4
    assert seen[2].unique().numel() > 4
    assert len(model.router._forward_hooks) == 1  # only the capture hook is left


def test_qat_removed_on_exception() -> None:
    model = tiny()
    with pytest.raises(RuntimeError), qat(model, QuantConfig(bits=4)):
        raise RuntimeError("stop")
    assert not any(type(m).__name__.startswith("Parametrized") for m in model.modules())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in tiny().named_parameters()]
