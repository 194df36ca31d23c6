"""Defenses: pruning criteria, masks held through fine-tuning, fine-tuning data, Neural Cleanse, STRIP,
expert pruning, registry schemas.

One tiny backdoored pMoE (digits at 8x8, a 2x2 white BadNets square top-left, target 0, 10% poisoned) is
trained once for the whole file; tests that only need a model's shape use fresh untrained ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.attacks import BadNets, poison_training_set
from bench.data.base import TensorData
from bench.defenses import (
    DefenseContext,
    ExpertPruning,
    FinePruning,
    FineTuning,
    NeuralCleanse,
    Pruning,
    Strip,
    anomaly_indices,
    auroc,
)
from bench.defenses.neural_cleanse import BUDGET as NC_BUDGET
from bench.errors import ComponentParamsError
from bench.evaluate import evaluate
from bench.jobs import build_model
from bench.models.base import BenchModel
from bench.registry import REGISTRY
from bench.scenario import TrainSpec
from bench.train import fit
from tests.conftest import FP32

FAST = settings(max_examples=15, deadline=None)
TARGET = 0
NAMES = {"fine-pruning", "fine-tuning", "pruning", "expert-pruning", "neural-cleanse", "strip"}
TINY = {"name": "pmoe", "width": 1, "experts": 2, "topk": 2}


@dataclass
class Backdoored:
    data: TensorData
    model: BenchModel
    trigger: BadNets
    cfg: dict[str, Any]
    before: dict[str, Any]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="session")
def backdoored(digits8: TensorData) -> Backdoored:
    """A width-1 pMoE (2 experts, top-2 of 4 patches) with a BadNets backdoor; trained once."""
    torch.manual_seed(0)
    model = build_model(TINY, digits8)
    trigger = BadNets(size=2, position="top-left")
    poisoned = poison_training_set(digits8.train_x, digits8.train_y, trigger, TARGET, 0.1, seed=0)
    cfg = TrainSpec(epochs=4, batch_size=64, lr=0.05, **FP32).model_dump()
    fit(model, poisoned.x, poisoned.y, cfg, seed=0)
    before = evaluate(model, digits8, trigger, TARGET)
    assert before["asr"] > 0.95 and before["ba"] > 0.9, before  # the fixture really is backdoored
    return Backdoored(digits8, model, trigger, cfg, before)


def make_ctx(
    data: TensorData, cfg: dict[str, Any], n_clean: int = 300, seed: int = 0, **kw: Any
) -> DefenseContext:
    idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed + 1))[:n_clean]
    return DefenseContext(
        clean_x=data.train_x[idx], clean_y=data.train_y[idx], train_cfg=cfg, seed=seed,
        num_classes=data.num_classes, test_x=data.test_x, test_y=data.test_y, **kw,
    )


def fresh(data: TensorData, seed: int = 0) -> BenchModel:
    torch.manual_seed(seed)
    return build_model(TINY, data)


def small_cfg(**kw: Any) -> dict[str, Any]:
    return TrainSpec(**{"epochs": 1, "batch_size": 32, "lr": 0.05, **FP32, **kw}).model_dump()


# ------------------------------------------------------------------------------------------- registry


def test_every_defense_is_registered_with_a_budget_and_its_stages():
    assert set(REGISTRY.names("defense")) >= NAMES
    for name in NAMES:
        comp = REGISTRY.get("defense", name)
        defense = comp.create()
        budget = {p.name: p for p in comp.params}["budget"]
        want = NC_BUDGET if name == "neural-cleanse" else 0.05  # Neural Cleanse's unlearning set: its own
        assert budget.default == want and defense.budget == want
        assert isinstance(comp.factory.stages, tuple)
    assert REGISTRY.get("defense", "fine-pruning").create(rate=0.3, budget=0.1).rate == 0.3


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("fine-pruning", {"rate": 1.5}, "rate"),
        ("fine-pruning", {"criterion": "random"}, "criterion"),
        ("pruning", {"rat": 0.1}, "rat"),
        ("fine-tuning", {"epochs": 0}, "epochs"),
        ("fine-tuning", {"budget": 1.5}, "budget"),
        ("fine-tuning", {"lr": -0.1}, "lr"),
        ("neural-cleanse", {"steps": 0}, "steps"),
        ("neural-cleanse", {"classes": "all"}, "classes"),
        ("expert-pruning", {"action": "zap"}, "action"),
        ("expert-pruning", {"expert": -1}, "expert"),
        ("strip", {"frr": 0.0}, "frr"),
        ("strip", {"budget": 0}, "budget"),
    ],
)
def test_bad_params_are_component_params_errors_naming_the_field(name, params, field):
    with pytest.raises(ComponentParamsError, match=field):
        REGISTRY.get("defense", name).create(**params)


# -------------------------------------------------------------------------------------------- pruning


def _expert_convs(model: BenchModel) -> list[torch.nn.Conv2d]:
    return [conv for _, conv in model.prunable_convs()]


@FAST
@given(data=st.data(), rate=st.floats(0.0, 0.95))
def test_raw_output_criterion_prunes_the_channels_with_the_lowest_raw_mean(digits8, data, rate):
    """Zero filters and hand-set biases make each channel's mean raw output equal to its bias."""
    model = fresh(digits8)
    expected = []
    for conv in _expert_convs(model):
        c = conv.out_channels
        bias = torch.tensor(data.draw(st.permutations(range(c))), dtype=torch.float32) - c / 2 + 0.5
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.copy_(bias)
        expected.append(set(torch.argsort(bias)[: int(c * rate)].tolist()))
    ctx = make_ctx(digits8, small_cfg(), n_clean=16)
    stage = Pruning(rate=rate, criterion="raw-output").run(model, ctx)[0]
    for (name, _), want in zip(model.prunable_convs(), expected, strict=True):
        zero = set(torch.nonzero(stage.state[f"{name}.bias"] == 0).flatten().tolist())
        assert zero == want
    assert stage.metrics["pruned_channels"] == sum(len(w) for w in expected)


@FAST
@given(data=st.data(), rate=st.floats(0.05, 0.95))
def test_magnitude_criterion_prunes_the_smallest_filters(digits8, data, rate):
    model = fresh(digits8)
    expected = []
    for conv in _expert_convs(model):
        c = conv.out_channels
        scale = torch.tensor(data.draw(st.permutations(range(1, c + 1))), dtype=torch.float32)
        with torch.no_grad():
            conv.weight.copy_(conv.weight.sign() * scale.view(-1, 1, 1, 1))  # L1 norm = scale * fan_in
            conv.bias.fill_(1.0)
        expected.append(set(torch.argsort(scale)[: int(c * rate)].tolist()))
    stage = Pruning(rate=rate, criterion="magnitude").run(model, make_ctx(digits8, small_cfg(), n_clean=8))[0]
    for (name, _), want in zip(model.prunable_convs(), expected, strict=True):
        w = stage.state[f"{name}.weight"]
        zero = set(torch.nonzero(w.flatten(1).abs().sum(1) == 0).flatten().tolist())
        assert zero == want
        assert set(torch.nonzero(stage.state[f"{name}.bias"] == 0).flatten().tolist()) == want


def test_pruned_channels_stay_zero_during_and_after_finetuning(backdoored):
    """On a trained model (in a fresh one a zeroed channel gets no gradient anyway, see below)."""
    model = copy.deepcopy(backdoored.model)
    start = copy.deepcopy(model.state_dict())
    seen: list[int] = []

    def check(epoch: int, _epochs: int, _loss: float) -> None:
        for conv in _expert_convs(model):
            dead = conv.weight.flatten(1).abs().sum(1) == 0
            assert dead.sum() == int(conv.out_channels * 0.25)
            assert torch.all(conv.bias[dead] == 0)
        seen.append(epoch)

    cfg = small_cfg(optimizer="sgd", momentum=0.9, weight_decay=5e-4)
    ctx = make_ctx(backdoored.data, cfg, n_clean=96, on_epoch=check)
    pruned, finetuned = FinePruning(rate=0.25, epochs=2).run(model, ctx)
    assert seen == [1, 2]
    for name, _ in model.prunable_convs():
        dead = pruned.state[f"{name}.weight"].flatten(1).abs().sum(1) == 0
        assert dead.sum() == int(len(dead) * 0.25)
        assert torch.all(finetuned.state[f"{name}.weight"][dead] == 0)
        assert torch.all(finetuned.state[f"{name}.bias"][dead] == 0)
        assert not torch.equal(finetuned.state[f"{name}.weight"][~dead], start[f"{name}.weight"][~dead])


def test_without_keep_pruned_the_channels_grow_back(backdoored):
    """The mask is what holds the zeros (BadPatches' code fine-tunes without one). A trained model is
    needed: in a fresh one the head's BatchNorm shift is 0, so a zeroed channel sits at ReLU's kink and
    gets no gradient."""
    ctx = make_ctx(backdoored.data, small_cfg(), n_clean=96)
    model = copy.deepcopy(backdoored.model)
    pruned, finetuned = FinePruning(rate=0.25, epochs=1, keep_pruned=False).run(model, ctx)
    name = "moe.experts.0.conv"
    dead = pruned.state[f"{name}.weight"].flatten(1).abs().sum(1) == 0
    assert dead.any() and finetuned.state[f"{name}.weight"][dead].abs().sum() > 0


# ----------------------------------------------------------------------------------------- fine-tuning


def test_finetuning_trains_on_exactly_the_defender_data(digits8):
    ctx = make_ctx(digits8, small_cfg(), n_clean=64, seed=3)
    stage = FineTuning(epochs=2, lr=0.02).run(fresh(digits8), ctx)[0]
    reference = fresh(digits8)
    fit(reference, ctx.clean_x, ctx.clean_y, {**ctx.train_cfg, "lr": 0.02}, seed=3, epochs=2)
    for key, value in reference.state_dict().items():
        assert torch.equal(stage.state[key], value), key
    other_y = ctx.clean_y.clone()
    other_y[0] = (other_y[0] + 1) % 10
    changed = FineTuning(epochs=2, lr=0.02).run(fresh(digits8), replace(ctx, clean_y=other_y))[0]
    assert not torch.equal(changed.state["fc.weight"], stage.state["fc.weight"])


def test_defenses_leave_the_context_tensors_untouched_and_return_their_stages(digits8):
    trigger = BadNets(size=2, position="top-left")
    ctx = make_ctx(digits8, small_cfg(), n_clean=40, trigger=trigger, target=TARGET)
    before = {k: getattr(ctx, k).clone() for k in ("clean_x", "clean_y", "test_x", "test_y")}
    cheap = [
        FinePruning(epochs=1), FineTuning(epochs=1), Pruning(),
        ExpertPruning(source="oracle", epochs=1),
        NeuralCleanse(steps=3, batch_size=4, classes=[0, 1, 2]),
        Strip(n=2, test_limit=20),
    ]
    for defense in cheap:
        stages = defense.run(fresh(digits8), ctx)
        assert [s.name for s in stages if s.state is not None] == list(type(defense).stages)
        for s in stages:
            if s.state is not None:
                fresh(digits8).load_state_dict(s.state)
        for key, value in before.items():
            assert torch.equal(getattr(ctx, key), value), (type(defense).__name__, key)


# -------------------------------------------------------------------------------------- neural cleanse


def test_anomaly_index_is_the_mad_outlier_score():
    norms = torch.tensor([1.0, 10.0, 11.0, 9.0, 10.0, 12.0, 8.0])
    idx = anomaly_indices(norms)
    mad = 1.4826 * 1.0  # median 10, absolute deviations [9, 0, 1, 1, 0, 2, 2] -> median 1
    assert idx[0] == pytest.approx(9 / mad)
    assert idx[2] == pytest.approx(1 / mad)


def test_neural_cleanse_recovers_the_planted_trigger_and_unlearns_it(backdoored):
    """On 8x8 digits the clean classes need small masks too (about 10-15 of 64 pixels), so the target's
    anomaly index sits around 2.2-3 across defender seeds; the reversed trigger itself is robust."""
    ctx = make_ctx(backdoored.data, backdoored.cfg, trigger=backdoored.trigger, target=TARGET)
    model = copy.deepcopy(backdoored.model)
    defense = NeuralCleanse(steps=100, lambda_init=0.05, batch_size=16, epochs=3)
    detected, unlearned = defense.run(model, ctx)
    m = detected.metrics
    norms = {int(c): float(n) for c, n in (item.split(":") for item in str(m["mask_norms"]).split(","))}
    assert detected.state is None and len(norms) == 10
    assert min(norms, key=norms.get) == TARGET
    assert m["flagged_class"] == TARGET and m["correct_flag"] == 1 and m["anomaly_index"] > 2
    assert m["target_mask_norm"] < 6  # about the 2x2 square's 4 pixels ...
    assert m["target_mask_in_trigger"] > 0.8  # ... and on it
    model.load_state_dict(unlearned.state)
    after = evaluate(model, backdoored.data, backdoored.trigger, TARGET)
    assert unlearned.metrics["applied"] == 1
    assert after["asr"] < 0.2 and after["ba"] > backdoored.before["ba"] - 0.05


# ------------------------------------------------------------------------------------------------ strip


def test_strip_separates_triggered_from_clean_inputs(backdoored):
    ctx = make_ctx(backdoored.data, backdoored.cfg, trigger=backdoored.trigger, target=TARGET)
    (stage,) = Strip(n=10, test_limit=200).run(backdoored.model, ctx)
    m = stage.metrics
    assert stage.state is None and stage.name == "filtered"
    assert m["auroc"] > 0.9 and m["tpr"] > 0.8 and m["fpr"] < 0.1
    assert m["asr_after_filter"] < 0.2 <= m["ba_after_filter"]
    clean_only = Strip(n=4, test_limit=50).run(backdoored.model, make_ctx(backdoored.data, backdoored.cfg))[0]
    assert "far" not in clean_only.metrics and 0 <= clean_only.metrics["frr"] <= 1


@FAST
@given(pos=st.lists(st.integers(0, 5), min_size=1, max_size=12), neg=st.lists(st.integers(0, 5), min_size=1,
                                                                              max_size=12))
def test_auroc_is_the_pairwise_win_rate(pos, neg):
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    got = auroc(torch.tensor(pos, dtype=torch.float), torch.tensor(neg, dtype=torch.float))
    assert got == pytest.approx(wins)


# --------------------------------------------------------------------------------------- expert pruning


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_expert_pruning_drop_changes_exactly_the_declared_expert(digits8, backdoored):
    model = fresh(digits8)
    with torch.no_grad():
        for conv in _expert_convs(model):
            conv.bias.fill_(0.1)  # fresh biases are zero; make dropping visible on them too
        model.prunable_layers()[1].norm.bias.fill_(0.1)  # a trained head BatchNorm shifts channels
    start = copy.deepcopy(model.state_dict())
    ctx = make_ctx(digits8, small_cfg(), n_clean=32)
    layer = model.prunable_layers()[1]
    norm_name = next(n for n, m in model.named_modules() if m is layer.norm)
    pruned, finetuned = ExpertPruning(expert=1, action="drop", epochs=0).run(model, ctx)
    # the expert's conv and its channels of the head BatchNorm: dropped means silent, not a BN-bias constant
    assert _differing(start, pruned.state) == {"moe.experts.1.conv.weight", "moe.experts.1.conv.bias",
                                               f"{norm_name}.weight", f"{norm_name}.bias"}
    assert pruned.state["moe.experts.1.conv.weight"].abs().sum() == 0
    own = slice(layer.start, layer.start + layer.conv.out_channels)
    assert pruned.state[f"{norm_name}.bias"][own].abs().sum() == 0
    assert pruned.state[f"{norm_name}.bias"][: layer.start].equal(start[f"{norm_name}.bias"][: layer.start])
    seen: list[torch.Tensor] = []
    hook = (layer.act or layer.conv).register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    model.load_state_dict(pruned.state)
    model.eval()
    with torch.no_grad():
        model(digits8.test_x[:64])
    hook.remove()
    assert seen[0][:, own].abs().sum() == 0 and seen[0].abs().sum() > 0
    assert pruned.metrics["expert"] == 1 and pruned.metrics["source"] == "declared"
    assert _differing(pruned.state, finetuned.state) == set()
    trained = copy.deepcopy(backdoored.model)  # a trained model: its dropped expert would get gradients
    ctx96 = make_ctx(digits8, small_cfg(), 96)
    _, tuned = ExpertPruning(expert=1, action="drop", epochs=1).run(trained, ctx96)
    for key in ("moe.experts.1.conv.weight", "moe.experts.1.conv.bias"):
        assert tuned.state[key].abs().sum() == 0
    assert not torch.equal(tuned.state["fc.weight"], backdoored.model.state_dict()["fc.weight"])


def test_expert_pruning_reset_reinitialises_only_that_expert(digits8):
    model = fresh(digits8)
    with torch.no_grad():
        model.moe.experts[0].norm.running_mean.fill_(3.0)
    start = copy.deepcopy(model.state_dict())
    ctx = make_ctx(digits8, small_cfg(), 16)
    pruned, _ = ExpertPruning(expert=0, action="reset", epochs=0).run(model, ctx)
    changed = _differing(start, pruned.state)
    assert changed and all(k.startswith("moe.experts.0.") for k in changed)
    assert torch.all(pruned.state["moe.experts.0.norm.running_mean"] == 0)


def test_expert_pruning_oracle_picks_the_expert_whose_routing_moves_most(backdoored):
    ctx = make_ctx(backdoored.data, backdoored.cfg, n_clean=120, trigger=backdoored.trigger, target=TARGET)
    model = copy.deepcopy(backdoored.model).eval()
    with torch.no_grad():
        _, clean = model.forward_routing(ctx.clean_x)
        _, trig = model.forward_routing(backdoored.trigger(ctx.clean_x))
    moved = (clean.selection_mask() != trig.selection_mask()).flatten(2).float().sum(2).mean(0)
    pruned, _ = ExpertPruning(source="oracle", epochs=0).run(model, ctx)
    assert pruned.metrics["expert"] == int(moved.argmax())
    assert pruned.metrics["routing_change_max"] == pytest.approx(float(moved.max()) / (2 * 2), abs=1e-6)


def test_expert_pruning_needs_a_routed_model(digits8):
    torch.manual_seed(0)
    dense = build_model({"name": "dense", "width": 1}, digits8)
    with pytest.raises(ComponentParamsError, match="routing"):
        ExpertPruning(expert=0).run(dense, make_ctx(digits8, small_cfg(), 8))
    with pytest.raises(ComponentParamsError, match="oracle"):
        ExpertPruning(source="oracle").run(fresh(digits8), make_ctx(digits8, small_cfg(), 8))
