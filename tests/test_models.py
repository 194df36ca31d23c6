"""Models: WRN-pMoE (routing, parameter groups, pruning surface, presets, validation) and the dense WRN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bench.errors import ComponentParamsError
from bench.models import PAPER_CONFIG, DenseWRN, PMoE
from bench.registry import REGISTRY, get

SHAPES = [(1, 16, 16), (1, 28, 28), (3, 32, 32)]


def build(name: str = "pmoe", shape: tuple[int, int, int] = (1, 16, 16), classes: int = 10, **params):
    c = shape[0]
    if name == "pmoe":
        params = {"width": 1, "topk": 4, **params}
    elif name == "dense":
        params = {"width": 1, **params}
    return get("model", name).create(
        input_shape=shape, num_classes=classes, mean=(0.5,) * c, std=(0.25,) * c, **params
    )


def images(shape: tuple[int, int, int], n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


# --- registration and shapes -------------------------------------------------------------------------


def test_models_are_registered():
    names = REGISTRY.names("model")
    assert {"pmoe", "pmoe-paper", "dense"} <= set(names)
    assert isinstance(build("pmoe"), PMoE)
    assert isinstance(build("dense"), DenseWRN)


@pytest.mark.parametrize("shape", SHAPES)
def test_pmoe_output_and_routing_shapes(shape):
    model = build("pmoe", shape, classes=7)
    logits, routing = model.forward_routing(images(shape))
    rows, cols = shape[1] // 4, shape[2] // 4
    assert logits.shape == (4, 7)
    assert routing.grid == model.patch_grid == (rows, cols)
    assert routing.patch_px == model.patch_px == (4, 4)
    assert routing.indices.shape == routing.gates.shape == (4, 4, 4)
    assert routing.scores.shape == (4, 4, rows * cols)
    assert model(images(shape)).shape == (4, 7)


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_output_shape_and_no_routing(shape):
    model = build("dense", shape, classes=3)
    logits, routing = model.forward_routing(images(shape))
    assert logits.shape == (4, 3)
    assert routing is None
    assert model.patch_grid is None


def test_coarser_patch_grid_sets_patch_size_in_input_pixels():
    model = build("pmoe", (3, 32, 32), patch_grid=4, topk=3)
    _, routing = model.forward_routing(images((3, 32, 32)))
    assert model.patch_grid == (4, 4) and model.patch_px == (8, 8)
    assert routing.scores.shape[-1] == 16


def test_mnist_grid_is_7x7():
    model = build("pmoe", (1, 28, 28), patch_grid=7, topk=16)
    assert model.patch_grid == (7, 7) and model.patch_px == (4, 4)


# --- routing invariants ------------------------------------------------------------------------------


def check_routing(routing, topk: int, n: int, softmax: str) -> None:
    idx = routing.indices
    assert idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert (idx.sort(dim=2).values.diff(dim=2) > 0).all(), "indices of one expert must be distinct"
    assert (routing.gates > 0).all()
    # Indices are the top-k of the scores.
    kept = routing.scores.gather(2, idx)
    kth = kept.min(dim=2, keepdim=True).values
    assert ((routing.scores > kth).sum(dim=2) <= topk - 1).all()
    if softmax == "kept":
        expected = kept.softmax(dim=2)
        torch.testing.assert_close(routing.gates.sum(dim=2), torch.ones_like(routing.gates[..., 0]))
    else:
        expected = routing.scores.softmax(dim=2).gather(2, idx)
    torch.testing.assert_close(routing.gates, expected)
    assert (routing.selection_mask().flatten(2).sum(dim=2) == topk).all()


@settings(max_examples=12, deadline=None)
@given(
    experts=st.integers(1, 4),
    grid=st.sampled_from([1, 2, 4]),
    data=st.data(),
    softmax=st.sampled_from(["all", "kept"]),
    seed=st.integers(0, 2**16),
)
def test_routing_invariants(experts, grid, data, softmax, seed):
    n = grid * grid
    topk = data.draw(st.integers(1, n))
    torch.manual_seed(seed)
    model = build("pmoe", (1, 16, 16), experts=experts, topk=topk, patch_grid=grid, gate_softmax=softmax)
    # Routers at init are tiny (N(0, 1e-4)); spread them so the top-k is not a near-tie.
    with torch.no_grad():
        model.moe.router.weight.normal_()
    _, routing = model.forward_routing(images((1, 16, 16), n=3, seed=seed))
    assert routing.indices.shape == (3, experts, topk)
    check_routing(routing, topk, n, softmax)


def test_gates_over_all_scores_sum_below_one_when_sparse():
    model = build("pmoe", (1, 16, 16), topk=4, gate_softmax="all")
    _, routing = model.forward_routing(images((1, 16, 16)))
    assert (routing.gates.sum(dim=2) < 1).all()


@pytest.mark.parametrize(("shape", "patch_grid"), [((1, 16, 16), None), ((3, 32, 32), 4), ((1, 28, 28), 7)])
def test_scores_are_inner_products_of_router_kernels_with_patches(shape, patch_grid):
    """g_{j,s} = <w_s, x^(j)> over the routed feature map, patches in row-major order."""
    model = build("pmoe", shape, patch_grid=patch_grid, topk=2)
    with torch.no_grad():
        model.moe.router.weight.normal_()
    seen = {}
    model.embed.register_forward_hook(lambda _m, _i, out: seen.__setitem__("h", out.detach().clone()))
    _, routing = model.forward_routing(images(shape))
    cell = model.moe.cell
    patches = F.unfold(seen["h"], kernel_size=cell, stride=cell)  # [N, C*ch*cw, n], row-major
    w = model.moe.router.weight.detach().flatten(1)  # [E, C*ch*cw]
    expected = torch.einsum("ed,ndj->nej", w, patches)
    torch.testing.assert_close(routing.scores, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("patch_grid", [None, 4])
def test_hand_set_router_selects_the_marked_patch(patch_grid):
    """Feature map zero except channel 0 on one patch: +e_0 router keeps it, -e_0 router never does."""
    model = build("pmoe", (3, 32, 32), patch_grid=patch_grid, experts=2, topk=3).eval()
    rows, cols = model.patch_grid
    ch, cw = model.moe.cell
    marked = 2 * cols + 1  # row 2, column 1

    def fake_features(_module, _inputs, out):
        h = torch.zeros_like(out)
        r, c = divmod(marked, cols)
        h[:, 0, r * ch : (r + 1) * ch, c * cw : (c + 1) * cw] = 1.0
        return h

    model.embed.register_forward_hook(fake_features)
    with torch.no_grad():
        model.moe.router.weight.zero_()
        model.moe.router.weight[0, 0] = 1.0
        model.moe.router.weight[1, 0] = -1.0
    _, routing = model.forward_routing(images((3, 32, 32)))
    assert (routing.indices[:, 0, 0] == marked).all(), "highest score comes first"
    assert not (routing.indices[:, 1] == marked).any()
    torch.testing.assert_close(routing.scores[:, 0, marked], torch.full((4,), float(ch * cw)))
    mask = routing.selection_mask()
    assert mask[:, 0, 2, 1].all() and not mask[:, 1, 2, 1].any()


def test_unselected_patches_do_not_reach_the_experts():
    """Changing a feature-map patch that no expert keeps leaves the output unchanged (eval mode)."""
    model = build("pmoe", (3, 32, 32), experts=2, topk=5).eval()
    with torch.no_grad():
        model.moe.router.weight.abs_()
    h = torch.rand(2, model.moe.router.in_channels, 8, 8) + 0.1
    out, indices, _, _ = model.moe(h)
    chosen = torch.zeros(2, 64, dtype=torch.bool)
    for e in range(2):
        chosen.scatter_(1, indices[:, e], True)
    free = (~chosen).nonzero()
    n, j = int(free[0, 0]), int(free[0, 1])
    h2 = h.clone()
    h2[n, :, j // 8, j % 8] *= 0.5  # lower score: still unselected, different content
    out2, indices2, _, _ = model.moe(h2)
    assert torch.equal(indices, indices2)
    torch.testing.assert_close(out, out2)
    # ...while a kept patch does change the output.
    k = int(indices[0, 0, 0])
    h3 = h.clone()
    h3[0, :, k // 8, k % 8] *= 1.5
    assert not torch.allclose(model.moe(h3)[0], out)


# --- gradients, groups, pruning -----------------------------------------------------------------------


@pytest.mark.parametrize("softmax", ["all", "kept"])
def test_gradient_reaches_router_kernels_through_gates(softmax):
    model = build("pmoe", (1, 16, 16), gate_softmax=softmax)
    with torch.no_grad():
        model.moe.router.weight.normal_()
    logits, routing = model.forward_routing(images((1, 16, 16), n=8))
    F.cross_entropy(logits, torch.arange(8) % 10).backward()
    grad = model.moe.router.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # The gate values themselves are differentiable in the router kernels (top-k indices are not).
    model.zero_grad()
    _, routing = model.forward_routing(images((1, 16, 16), n=8))
    routing.gates[..., 0].sum().backward()
    assert model.moe.router.weight.grad.abs().sum() > 1e-6


def test_parameter_groups_partition():
    model = build("pmoe", (1, 16, 16), experts=3)
    groups = model.parameter_groups()
    assert groups["gate"] == ["moe.router.weight"]
    expert_params = {f"moe.experts.{n}" for n, _ in model.moe.experts.named_parameters()}
    assert set(groups["experts"]) == expert_params
    assert len(expert_params) == 3 * 4  # BN weight/bias + conv weight/bias per expert
    assert not set(groups["gate"]) & set(groups["experts"])
    all_names = {n for n, _ in model.named_parameters()}
    assert set(groups["gate"]) | set(groups["experts"]) < all_names
    assert not any(n.startswith("moe.") for n in all_names - set(groups["gate"]) - set(groups["experts"]))


def test_dense_has_no_groups():
    assert build("dense").parameter_groups() == {"gate": [], "experts": []}


def test_prunable_convs_are_each_experts_conv_and_pruning_them_cuts_the_experts():
    model = build("pmoe", (1, 16, 16), experts=4).eval()
    convs = model.prunable_convs()
    assert [n for n, _ in convs] == [f"moe.experts.{e}.conv" for e in range(4)]
    for name, conv in convs:
        assert isinstance(conv, nn.Conv2d) and model.get_submodule(name) is conv
        assert conv.out_channels == 16  # 64 * width / experts
    x1, x2 = images((1, 16, 16), seed=1), images((1, 16, 16), seed=2)
    assert not torch.allclose(model(x1), model(x2))
    with torch.no_grad():
        for _, conv in convs:
            conv.weight.zero_()
            conv.bias.zero_()
    torch.testing.assert_close(model(x1), model(x2))  # every path from input to logits was pruned


def test_dense_prunable_conv_is_last_backbone_conv():
    model = build("dense", (1, 16, 16), depth=16)
    [(name, conv)] = model.prunable_convs()
    assert name == "group3.1.conv2" and model.get_submodule(name) is conv
    assert conv.out_channels == 64


@pytest.mark.parametrize(("name", "params"), [("pmoe", {"experts": 4}), ("pmoe", {"experts": 3}),
                                                ("dense", {})])
def test_prunable_layers_tile_the_last_feature_map_before_pooling(name, params):
    """One layer per expert (or one for dense): its convolution's channels, in order, of the map that
    head_norm and the ReLU produce; the contract's conv names are those of prunable_convs."""
    model = build(name, (1, 16, 16), **params)
    layers = model.prunable_layers()
    assert [(lay.name, lay.conv) for lay in layers] == model.prunable_convs()
    assert all(lay.norm is model.head_norm and lay.act is model.relu for lay in layers)
    spans = [range(model.head_norm.num_features)[lay.span()] for lay in layers]
    assert [i for span in spans for i in span] == list(range(model.head_norm.num_features))
    assert [len(span) for span in spans] == [lay.channels for lay in layers]


# --- presets, validation, determinism ---------------------------------------------------------------


def test_paper_preset_config():
    model = get("model", "pmoe-paper").create(
        input_shape=(3, 32, 32), num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    assert model.config == PAPER_CONFIG
    assert model.patch_grid == (8, 8) and model.patch_px == (4, 4)
    assert len(model.moe.experts) == 4 and model.moe.topk == 16
    assert model.moe.router.in_channels == 640
    assert model.prunable_convs()[0][1].out_channels == 160
    assert len(model.trunk.group1) == 1  # WRN-10: one block per group
    _, routing = model.forward_routing(images((3, 32, 32), n=2))
    assert routing.indices.shape == (2, 4, 16) and routing.scores.shape == (2, 4, 64)


def test_paper_preset_sets_only_hyperparameters():
    assert {p.name for p in get("model", "pmoe-paper").params} == set()
    with pytest.raises(ComponentParamsError, match="unknown parameter"):
        get("model", "pmoe-paper").create(input_shape=(3, 32, 32), num_classes=10, mean=(0.5,) * 3,
                                          std=(0.2,) * 3, topk=8)


def test_defaults_are_the_papers():
    params = {p.name: p.default for p in get("model", "pmoe").params}
    assert params["depth"] == 10 and params["width"] == 10
    assert params["experts"] == 4 and params["topk"] == 16 and params["gate_softmax"] == "all"


@pytest.mark.parametrize(
    ("shape", "params", "fragments"),
    [
        ((1, 16, 16), {"topk": 17}, ["topk", "[1, 16]", "17"]),
        ((1, 16, 16), {"topk": 0}, ["topk", "[1, 16]"]),
        ((1, 16, 16), {"patch_grid": 3}, ["patch_grid", "4x4", "valid: 1, 2, 4", "got 3"]),
        ((1, 28, 28), {"patch_grid": 8}, ["patch_grid", "7x7", "valid: 1, 7"]),
        ((1, 16, 16), {"depth": 12}, ["depth", "6n+4", "12"]),
        ((1, 16, 16), {"width": 0}, ["width", ">= 1"]),
        ((1, 16, 16), {"experts": 0}, ["experts", ">= 1"]),
        ((1, 16, 16), {"expert_channels": 0}, ["expert_channels", ">= 1"]),
        ((1, 16, 16), {"dropout": 1.0}, ["dropout", "[0, 1)"]),
        ((1, 30, 30), {}, ["input_shape", "divisible by 4", "30x30"]),
    ],
)
def test_bad_params_raise_helpful_errors(shape, params, fragments):
    with pytest.raises(ComponentParamsError) as info:
        build("pmoe", shape, **params)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_schema_errors_come_from_the_registry():
    with pytest.raises(ComponentParamsError, match="did you mean 'topk'"):
        build("pmoe", topkk=3)
    with pytest.raises(ComponentParamsError, match="gate_softmax"):
        build("pmoe", gate_softmax="some")
    with pytest.raises(ComponentParamsError, match="depth"):
        build("dense", depth=11)


def test_context_mismatch_and_paper_preset_on_wrong_input():
    with pytest.raises(ComponentParamsError, match="mean has 1 values but the input has 3"):
        get("model", "pmoe").create(input_shape=(3, 32, 32), num_classes=10, mean=(0.5,), std=(0.2,) * 3)
    with pytest.raises(ComponentParamsError, match="pmoe-paper.*patch_grid"):
        get("model", "pmoe-paper").create(input_shape=(1, 28, 28), num_classes=10, mean=(0.5,), std=(0.2,))


def test_wrong_batch_shape_is_refused():
    with pytest.raises(ValueError, match="built for inputs"):
        build("pmoe", (1, 16, 16))(torch.rand(2, 1, 32, 32))


@pytest.mark.parametrize("name", ["pmoe", "dense"])
def test_seeded_init_is_deterministic(name):
    torch.manual_seed(3)
    a = build(name).state_dict()
    torch.manual_seed(3)
    b = build(name).state_dict()
    torch.manual_seed(4)
    c = build(name).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_router_init_is_small_as_in_reference():
    std = float(build("pmoe", (3, 32, 32), width=2).moe.router.weight.detach().std())
    assert 5e-5 < std < 2e-4


# --- memory format and precision ---------------------------------------------------------------------


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    model = build("pmoe", (3, 32, 32), gate_softmax="kept").eval()
    with torch.no_grad():
        model.moe.router.weight.normal_()
    x = images((3, 32, 32))
    with torch.no_grad():
        ref, r_ref = model.forward_routing(x)
        model = model.to(memory_format=torch.channels_last)
        out, r_cl = model.forward_routing(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(r_cl.indices, r_ref.indices)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, routing = model.forward_routing(x)
    assert routing.scores.dtype == torch.float32  # the router runs in float32
    logits.float().sum().backward()
    assert torch.isfinite(model.moe.router.weight.grad).all()
