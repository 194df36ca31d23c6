"""NAD (Li et al., ICLR 2021): the attention map of their ``at.py``, the feature maps it aligns in pMoE and
dense, that its loss pulls the student's maps to the teacher's, and that it erases a tiny BadNets backdoor.

One tiny backdoored pMoE (digits at 8x8, a 2x2 white BadNets square top-left, target 0, 10% poisoned) is
trained once for the file.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks import BadNets
from bench.data.base import TensorData
from bench.defenses.nad import (
    NAD,
    DistillationObjective,
    attention_layers,
    attention_loss,
    attention_map,
    beta_scale,
    recording,
    stepped_fit,
)
from bench.errors import BenchError, ComponentParamsError
from bench.evaluate import evaluate
from bench.jobs import build_model
from bench.models.base import BenchModel
from bench.registry import REGISTRY
from tests.conftest import TINY_PMOE, backdoored_copy, defense_cfg, defense_ctx

TARGET = 0
TINY = TINY_PMOE

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


cfg = defense_cfg


ctx_for = defense_ctx


@pytest.fixture(scope="module")
def backdoored(digits8: TensorData, badnets_digits8_state: dict[str, torch.Tensor]) -> BenchModel:
    return backdoored_copy(digits8, badnets_digits8_state)  # trained once per session (conftest)


def test_attention_map_is_the_normalised_mean_of_squared_magnitudes_over_channels():
    fm = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[-1.0, 0.0], [2.0, 1.0]]]])  # [1, 2 channels, 2, 2]
    power = torch.tensor([[(1 + 1) / 2, (4 + 0) / 2, (0 + 4) / 2, (9 + 1) / 2]])  # mean_c |F_c|^2, flattened
    want = power / power.norm()
    assert torch.allclose(attention_map(fm), want, atol=1e-6)
    assert torch.allclose(attention_map(fm * 7.0), want, atol=1e-6)  # invariant to the features' scale
    cubed = fm.abs().pow(3).mean(1).flatten(1)
    assert torch.allclose(attention_map(fm, p=3), cubed / cubed.norm(), atol=1e-6)
    other = torch.rand(1, 2, 2, 2)
    assert attention_loss(fm, other) == pytest.approx(float(((want - attention_map(other)) ** 2).mean()))
    assert float(attention_loss(fm, 3 * fm)) == pytest.approx(0.0, abs=1e-10)


def test_beta_scale_is_one_on_cifar_sized_inputs():
    assert beta_scale((3, 32, 32)) == 1.0 and beta_scale((1, 8, 8)) == 1 / 16


@pytest.mark.parametrize(("kind", "last"), [("pmoe", "moe"), ("dense", "group3")])
def test_attention_layers_are_the_two_wrn_groups_and_the_last_stage(digits8, kind, last):
    model = build_model(TINY if kind == "pmoe" else {"name": "dense", "width": 1}, digits8).eval()
    layers = attention_layers(model)
    assert [name for name, _ in layers] == ["trunk.group1", "trunk.group2", last]
    with recording(layers) as seen, torch.no_grad():
        model(digits8.test_x[:3])
    assert [tuple(t.shape) for t in seen] == [(3, 16, 8, 8), (3, 32, 4, 4), (3, 64, 2, 2)]
    if kind == "pmoe":  # the MoE layer's output: the concatenated experts, what head_norm normalises
        assert seen[2].shape[1] == model.moe.out_channels == model.head_norm.num_features


def test_a_model_without_residual_groups_is_a_clear_error(digits8):
    class Flat(BenchModel):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
            return self.fc(x.flatten(1)), None

    with pytest.raises(BenchError, match="attention_layers"):
        NAD(epochs=1, teacher_epochs=1).run(Flat(), ctx_for(digits8))


def test_the_distillation_loss_pulls_the_students_maps_to_the_teachers(digits8, backdoored):
    torch.manual_seed(3)
    teacher = build_model(TINY, digits8).eval()  # an unrelated network: maps far from the student's
    student = copy.deepcopy(backdoored).eval()  # eval mode: BatchNorm statistics stay put, only weights move
    x, y = digits8.train_x[:64], digits8.train_y[:64]
    with recording(attention_layers(student)) as s_maps, recording(attention_layers(teacher)) as t_maps:
        plain = DistillationObjective(s_maps, teacher, t_maps, [0.0, 0.0, 0.0])
        with torch.no_grad():
            assert float(plain(student, x, y)) == pytest.approx(float(F.cross_entropy(student(x), y)), rel=1e-6)
        objective = DistillationObjective(s_maps, teacher, t_maps, [1e3, 1e3, 1e3])
        with torch.no_grad():
            objective(student, x, y)
        before = [float(attention_loss(s, t)) for s, t in zip(s_maps, t_maps, strict=True)]
        optimizer = torch.optim.SGD(student.parameters(), lr=1e-3)
        for _ in range(15):
            optimizer.zero_grad()
            objective(student, x, y).backward()
            optimizer.step()
        with torch.no_grad():
            objective(student, x, y)
        after = [float(attention_loss(s, t)) for s, t in zip(s_maps, t_maps, strict=True)]
    assert sum(after) < 0.5 * sum(before), (before, after)


def test_the_learning_rate_drops_tenfold_after_two_epochs(digits8, monkeypatch):
    calls: list[tuple[int, float]] = []
    import bench.defenses.nad as nad

    def fake_fit(model, x, y, config, *, epochs, **kw):
        calls.append((epochs, config["lr"]))
        for e in range(1, epochs + 1):
            kw["on_epoch"](e, epochs, 0.0)
        return nad.TrainResult(epoch_losses=[0.0] * epochs)

    monkeypatch.setattr(nad, "fit", fake_fit)
    seen: list[tuple[int, int]] = []
    ctx = ctx_for(digits8, on_epoch=lambda e, n, _loss: seen.append((e, n)))
    stepped_fit(nn.Linear(1, 1), ctx, 5, 0.1)
    assert calls == [(2, 0.1), (3, pytest.approx(0.01))]
    assert seen == [(e, 5) for e in range(1, 6)]


def test_nad_erases_a_badnets_backdoor_and_keeps_accuracy(digits8, backdoored):
    trigger = BadNets(size=2, position="top-left")
    before = evaluate(backdoored, digits8, trigger, TARGET)
    assert before["asr"] > 0.95 and before["ba"] > 0.95, before
    model = copy.deepcopy(backdoored)
    (stage,) = NAD(epochs=5, teacher_epochs=5, budget=0.1).run(model, ctx_for(digits8))
    assert stage.name == "distilled" and stage.metrics["attention_layers"] == "trunk.group1,trunk.group2,moe"
    model.load_state_dict(stage.state)
    after = evaluate(model.eval(), digits8, trigger, TARGET)
    assert after["asr"] < 0.4 and after["ba"] > 0.9, after  # measured: ASR 1.00 -> 0.12, BA 0.99 -> 0.97


@pytest.mark.parametrize(
    ("params", "field"),
    [({"epochs": 0}, "nad.epochs"), ({"teacher_epochs": 0}, "nad.teacher_epochs"), ({"beta2": -1.0}, "nad.beta2"),
     ({"p": 0.0}, "nad.p"), ({"lr": 0.0}, "nad.lr"), ({"budget": 0.0}, "nad.budget")],
)
def test_bad_params_name_the_field(params, field):
    with pytest.raises(ComponentParamsError, match=field):
        REGISTRY.get("defense", "nad").create(**params)


def test_registered_with_the_papers_defaults_and_threat_model():
    comp = REGISTRY.get("defense", "nad")
    defaults = {p.name: p.default for p in comp.params}
    assert defaults["epochs"] == 20 and defaults["budget"] == 0.05
    assert (defaults["beta1"], defaults["beta2"], defaults["beta3"], defaults["p"]) == (500.0, 1000.0, 1000.0, 2.0)
    assert comp.factory.sees == frozenset({"model", "clean"}) and comp.factory.stages == ("distilled",)
