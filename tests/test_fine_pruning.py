"""Fine-pruning prunes: pruned channels are silent (exactly zero where the classifier reads them) in
every built-in model, before and after fine-tuning, and each criterion removes exactly the channels with
the lowest score computed here by hand with hooks on real digits.

Models are tiny (width 1 on 8x8 digits), trained for two epochs so that BatchNorm statistics and
activations are those of a real network; ``pmoe-paper`` is built at its own size and only run forward.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bench.data.base import TensorData
from bench.defenses import DefenseContext, FinePruning, Pruning, prune
from bench.errors import ComponentParamsError
from bench.jobs import build_model
from bench.models.base import BenchModel
from bench.plugins import load_plugin_file
from bench.registry import REGISTRY
from bench.scenario import TrainSpec
from bench.train import fit

SPECS = {
    "pmoe": {"name": "pmoe", "width": 1, "experts": 2, "topk": 2},
    "dense": {"name": "dense", "width": 1},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def trained(digits8: TensorData) -> dict[str, BenchModel]:
    """Each small built-in model, trained two epochs on clean digits."""
    out = {}
    for kind, spec in SPECS.items():
        torch.manual_seed(0)
        model = build_model(spec, digits8)
        fit(model, digits8.train_x, digits8.train_y, cfg(epochs=2), seed=0)
        out[kind] = model.eval()
    return out


def cfg(**kw: Any) -> dict[str, Any]:
    return TrainSpec(**{"epochs": 1, "batch_size": 32, "lr": 0.05, **kw}).model_dump()


def ctx_for(data: TensorData, n_clean: int = 200, **kw: Any) -> DefenseContext:
    idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(1))[:n_clean]
    return DefenseContext(clean_x=data.train_x[idx], clean_y=data.train_y[idx], train_cfg=cfg(), seed=0,
                          num_classes=data.num_classes, **kw)


def head_features(model: BenchModel, x: torch.Tensor) -> torch.Tensor:
    """The last feature map ``[N, C, H, W]`` the classifier pools: ReLU of ``head_norm``'s output,
    read with a hook on ``head_norm`` (not through the model's pruning contract)."""
    seen: list[torch.Tensor] = []
    handle = model.head_norm.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().relu()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def last_convs(model: BenchModel) -> list[nn.Conv2d]:
    """The convolutions whose output channels are pruned, found from the architecture by hand."""
    if hasattr(model, "moe"):
        return [expert.conv for expert in model.moe.experts]
    return [model.group3[-1].conv2]


def hand_scores(model: BenchModel, x: torch.Tensor, criterion: str) -> list[torch.Tensor]:
    """Per pruned layer, each output channel's score, computed without the code under test."""
    convs = last_convs(model)
    if criterion == "magnitude":
        return [conv.weight.detach().abs().sum(dim=(1, 2, 3)) for conv in convs]
    if criterion == "activation":
        return list(head_features(model, x).mean(dim=(0, 2, 3)).split([c.out_channels for c in convs]))
    outputs: list[torch.Tensor] = []
    handles = [c.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach())) for c in convs]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [out.mean(dim=(0, 2, 3)) for out in outputs]


def pruned_channels(model: BenchModel) -> list[set[int]]:
    """Per layer, the channels whose filter is zero (what pruning removed)."""
    return [set(torch.nonzero(c.weight.detach().flatten(1).abs().sum(1) == 0).flatten().tolist())
            for c in last_convs(model)]


def silent_channels(model: BenchModel, x: torch.Tensor) -> list[set[int]]:
    """Per layer, the channels of the last feature map that are exactly zero on every image of ``x``."""
    feats = head_features(model, x).amax(dim=(0, 2, 3))
    parts = feats.split([c.out_channels for c in last_convs(model)])
    return [set(torch.nonzero(p == 0).flatten().tolist()) for p in parts]


def loaded(data: TensorData, kind: str, state: dict[str, torch.Tensor]) -> BenchModel:
    model = build_model(SPECS[kind], data)
    model.load_state_dict(state)
    return model.eval()


# ------------------------------------------------------------------------------------ silent channels


@pytest.mark.parametrize("kind", ["pmoe", "dense", "pmoe-paper"])
def test_pruning_every_channel_makes_the_logits_independent_of_the_input(kind):
    size = 32 if kind == "pmoe-paper" else 8
    data = REGISTRY.get("dataset", "digits").create(image_size=size)
    torch.manual_seed(0)
    model = build_model(SPECS.get(kind, {"name": kind}), data).eval()
    x = data.test_x[:2]
    with torch.no_grad():
        assert not torch.allclose(model(x)[0], model(x)[1])
    prune(model, data.train_x[:4], 1.0)
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(logits[0], logits[1])  # every feature the classifier reads is exactly 0
        assert torch.equal(logits[0], model.fc.bias)
        model.train()
        batch = model(data.test_x[:4])  # batch statistics in train mode: still silent
    assert torch.equal(batch, model.fc.bias.expand_as(batch))


def test_zeroing_only_the_dense_models_last_convolution_is_not_pruning(digits8):
    """The bug this replaces: the last convolution feeds a residual sum, so zeroing its filters leaves
    every channel alive."""
    torch.manual_seed(0)
    model = build_model(SPECS["dense"], digits8).eval()
    prune(model, digits8.train_x[:4], 1.0, silence=False)
    with torch.no_grad():
        logits = model(digits8.test_x[:2])
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("kind", ["pmoe", "dense"])
@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_exactly_the_pruned_channels_are_silent_before_and_after_finetuning(digits8, trained, kind, rate):
    model = copy.deepcopy(trained[kind])
    widths = [c.out_channels for c in last_convs(model)]
    assert silent_channels(model, digits8.test_x) == [set()] * len(widths)  # none silent beforehand
    during: list[list[set[int]]] = []

    def check(_epoch: int, _epochs: int, _loss: float) -> None:
        during.append(silent_channels(model, digits8.test_x))
        model.train()

    ctx = ctx_for(digits8, on_epoch=check)
    pruned, finetuned = FinePruning(rate=rate, epochs=2).run(model, ctx)
    removed = pruned_channels(loaded(digits8, kind, pruned.state))
    assert [len(r) for r in removed] == [int(rate * w) for w in widths]
    assert pruned.metrics["pruned_channels"] == sum(int(rate * w) for w in widths)
    for state in (pruned.state, finetuned.state):
        assert silent_channels(loaded(digits8, kind, state), digits8.test_x) == removed
    assert during == [removed, removed]
    assert not torch.equal(finetuned.state["fc.weight"], pruned.state["fc.weight"])  # it did fine-tune


# ---------------------------------------------------------------------------------------- criteria


@pytest.mark.parametrize("kind", ["pmoe", "dense"])
@pytest.mark.parametrize("criterion", ["activation", "raw-output", "magnitude"])
def test_each_criterion_prunes_the_channels_with_the_lowest_hand_computed_score(
    digits8, trained, kind, criterion
):
    model = copy.deepcopy(trained[kind])
    ctx = ctx_for(digits8)
    scores = hand_scores(model, ctx.clean_x, criterion)
    stage = Pruning(rate=0.5, criterion=criterion).run(model, ctx)[0]
    removed = pruned_channels(loaded(digits8, kind, stage.state))
    for score, cut in zip(scores, removed, strict=True):
        kept = sorted(set(range(len(score))) - cut)
        assert len(cut) == len(score) // 2
        assert score[sorted(cut)].max() <= score[kept].min() + 1e-6
    assert stage.metrics["criterion"] == criterion


def test_activation_and_raw_output_rank_differently_on_a_trained_model(digits8, trained):
    """The two data criteria are not the same ranking under another name."""
    ctx = ctx_for(digits8)
    cuts = {}
    for criterion in ("activation", "raw-output"):
        model = copy.deepcopy(trained["pmoe"])
        Pruning(rate=0.5, criterion=criterion).run(model, ctx)
        cuts[criterion] = pruned_channels(model)
    assert cuts["activation"] != cuts["raw-output"]


# ------------------------------------------------------------------------------- ranking vs tuning data


def test_rank_budget_ranks_on_the_first_share_and_finetunes_on_all(digits8, trained):
    ctx = ctx_for(digits8, n_clean=200)
    defense = FinePruning(rate=0.5, criterion="activation", epochs=1, budget=1.0, rank_budget=0.25)
    pruned, finetuned = defense.run(copy.deepcopy(trained["pmoe"]), ctx)
    assert pruned.metrics["n_rank"] == 50 and finetuned.metrics["n_clean"] == 200
    model = copy.deepcopy(trained["pmoe"])
    first = DefenseContext(clean_x=ctx.clean_x[:50], clean_y=ctx.clean_y[:50], train_cfg=ctx.train_cfg,
                           seed=0, num_classes=10)
    alone = Pruning(rate=0.5, criterion="activation").run(model, first)[0]
    assert all(torch.equal(alone.state[k], v) for k, v in pruned.state.items())
    everything = Pruning(rate=0.5, criterion="activation").run(copy.deepcopy(trained["pmoe"]), ctx)[0]
    assert any(not torch.equal(everything.state[k], v) for k, v in pruned.state.items())


@pytest.mark.parametrize(("params", "field"), [
    ({"budget": 0.2, "rank_budget": 0.5}, "rank_budget"),
    ({"rank_budget": 0.0}, "rank_budget"),
    ({"criterion": "raw"}, "criterion"),
])
def test_bad_fine_pruning_params_name_the_field(params, field):
    with pytest.raises(ComponentParamsError, match=field):
        REGISTRY.get("defense", "fine-pruning").create(**params)


def test_the_badpatches_code_setting_zeroes_only_the_convolution(digits8, trained):
    """keep_pruned=False: weights and biases of the convolution only, so pMoE's head BatchNorm still
    passes its shift for those channels (not silent), as in the published code."""
    model = copy.deepcopy(trained["pmoe"])
    pruned, _ = FinePruning(rate=0.5, criterion="raw-output", epochs=1, keep_pruned=False).run(
        model, ctx_for(digits8))
    after = loaded(digits8, "pmoe", pruned.state)
    removed = pruned_channels(after)
    assert [len(r) for r in removed] == [c.out_channels // 2 for c in last_convs(after)]
    assert pruned.metrics["silenced"] == 0
    assert silent_channels(after, digits8.test_x) != removed


class ConvOnly(BenchModel):
    """A plugin-style model that declares only ``prunable_convs``: conv, ReLU, pooling, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.fc(self.conv(x).relu().mean(dim=(2, 3))), None

    def prunable_convs(self) -> list[tuple[str, nn.Conv2d]]:
        return [("conv", self.conv)]


def test_a_model_declaring_only_prunable_convs_is_pruned_at_the_convolution(digits8):
    torch.manual_seed(0)
    model = ConvOnly().eval()
    [layer] = model.prunable_layers()
    assert layer.conv is model.conv and layer.norm is None and layer.act is None
    x = digits8.train_x[:64]
    with torch.no_grad():
        raw = model.conv(x).mean(dim=(0, 2, 3))
    [mask] = prune(model, x, 0.5, "activation")  # no act declared: the convolution's output is read
    assert set(mask.pruned.tolist()) == set(torch.argsort(raw)[:4].tolist())
    prune(model, x, 1.0)
    with torch.no_grad():
        logits = model(digits8.test_x[:2])
    assert torch.equal(logits[0], logits[1])


def test_clp_silences_an_expert_channel_where_the_classifier_reads_it(digits8, trained):
    """The CLP plugin prunes the pMoE experts' channels through the same contract: a planted
    high-Lipschitz expert channel ends up exactly zero in the last feature map (a trained model: in a
    fresh one the head BatchNorm's shift is zero anyway)."""
    load_plugin_file(Path(__file__).parents[1] / "plugins" / "clp.py")
    model = copy.deepcopy(trained["pmoe"])
    with torch.no_grad():
        model.moe.experts[1].conv.weight[3] *= 50
    REGISTRY.get("defense", "clp").create(u=3.0).run(model, ctx_for(digits8, n_clean=4))
    assert 3 in silent_channels(model, digits8.test_x)[1]
