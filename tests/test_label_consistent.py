"""The label-consistent backdoor (Turner, Tsipras, Madry 2019): clean-label poisoning of target-class images
first made hard to classify by PGD against a seeded surrogate, then the corner trigger."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from bench.attacks import LabelConsistent, build_attack_trigger, poison_training_set, triggered_test_set
from bench.cli import app
from bench.data.base import TensorData
from bench.errors import ComponentParamsError, ScenarioError
from bench.plan import build
from bench.registry import get
from bench.scenario import resolve
from bench.store import Store
from tests.conftest import TINY_PMOE, tiny_scenario

#: Cheap settings for the tests (the defaults train the surrogate 5 epochs and run 100 PGD steps).
FAST = {"steps": 10, "step_size": 4 / 255, "surrogate_epochs": 2}
TARGET, RATE = 0, 0.05


@pytest.fixture(scope="module")
def lc() -> LabelConsistent:
    return LabelConsistent(**FAST)


@pytest.fixture(scope="module")
def poisoned(digits8: TensorData, lc: LabelConsistent, one_thread):
    return poison_training_set(digits8.train_x, digits8.train_y, lc, TARGET, RATE, seed=0, mode="clean-label")


# --- what defines the attack ---------------------------------------------------------------------------------


def test_labels_unchanged_and_only_target_class_images_touched(digits8: TensorData, poisoned) -> None:
    x, y = digits8.train_x, digits8.train_y
    assert torch.equal(poisoned.y, y)  # clean-label: every label stays correct
    assert len(poisoned.indices) == round(RATE * len(y))
    assert (y[poisoned.indices] == TARGET).all()
    changed = (poisoned.x != x).flatten(1).any(dim=1)
    assert torch.equal(torch.nonzero(changed).flatten(), poisoned.indices)  # exactly the poisoned images change


def test_perturbation_is_within_eps_before_the_trigger_and_moves_the_image(digits8, lc, poisoned) -> None:
    idx = poisoned.indices
    x, y = digits8.train_x[idx], digits8.train_y[idx]
    hard = lc.perturb(x, y, digits8.train_x, digits8.train_y, seed=0)
    delta = (hard - x).abs()
    assert delta.max() <= lc.eps + 1e-6
    assert delta.max() >= lc.eps - 1e-6  # PGD reaches the L-inf budget somewhere
    assert hard.min() >= 0 and hard.max() <= 1
    # the poisoned training image is the perturbed image with the (training-amplitude) trigger
    assert torch.equal(poisoned.x[idx], lc.training_trigger(hard))


def test_perturbation_is_adversarial_for_the_surrogate(digits8, lc, poisoned) -> None:
    idx = poisoned.indices
    x, y = digits8.train_x[idx], digits8.train_y[idx]
    surrogate = lc.surrogate(digits8.train_x, digits8.train_y, seed=0)
    hard = lc.perturb(x, y, digits8.train_x, digits8.train_y, seed=0)
    noise = (x + lc.eps * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).sign()).clamp(0, 1)
    with torch.no_grad():
        clean_loss, adv_loss, noise_loss = (F.cross_entropy(surrogate(v), y).item() for v in (x, hard, noise))
    # hard to classify (the surrogate is adversarially trained, so its loss rises less than a plain model's)...
    assert adv_loss > 1.5 * clean_loss, (clean_loss, adv_loss)
    assert adv_loss > 1.3 * noise_loss, (noise_loss, adv_loss)  # ...by the gradient, not by moving the image
    with torch.no_grad():
        assert (surrogate(hard).argmax(1) == y).float().mean() < (surrogate(x).argmax(1) == y).float().mean()


def test_poisoned_set_is_reproducible_from_the_seed(digits8, lc, poisoned) -> None:
    again = poison_training_set(digits8.train_x, digits8.train_y, lc, TARGET, RATE, seed=0, mode="clean-label")
    assert torch.equal(again.x, poisoned.x) and torch.equal(again.indices, poisoned.indices)
    other = poison_training_set(digits8.train_x, digits8.train_y, lc, TARGET, RATE, seed=1, mode="clean-label")
    shared = sorted(set(other.indices.tolist()) & set(poisoned.indices.tolist()))
    assert not torch.equal(other.indices, poisoned.indices) or not torch.equal(other.x, poisoned.x)
    if shared:  # the same image, another seed: another surrogate, another perturbation
        assert not torch.equal(other.x[shared], poisoned.x[shared])


# --- the trigger -------------------------------------------------------------------------------------------------


def test_test_time_trigger_is_the_authors_corner_pattern_at_full_amplitude() -> None:
    weak = LabelConsistent(amplitude=16 / 255)
    x = torch.full((2, 3, 10, 12), 0.5)
    out = weak(x)  # the test-time trigger: full amplitude whatever the training amplitude
    # the authors' bottom-right corner (poison_attack.py, (row, col) -> +1 white / -1 black)
    authors = {
        (-1, -1): 1,
        (-1, -2): -1,
        (-1, -3): 1,
        (-2, -1): -1,
        (-2, -2): 1,
        (-2, -3): -1,
        (-3, -1): 1,
        (-3, -2): -1,
        (-3, -3): -1,
    }
    for (r, c), v in authors.items():
        assert (out[:, :, r, c] == (1.0 if v > 0 else 0.0)).all()
    assert torch.equal(out[..., 0:3, 0:3], out[..., 0:3, -3:].flip(-1))  # left corners mirror the right ones
    assert torch.equal(out[..., -3:, 0:3], out[..., 0:3, 0:3])
    assert torch.equal(out[..., 0:3, -3:], out[..., -3:, -3:])  # the top corners are the bottom ones
    assert torch.equal(out, out.flip(-1))  # the four-corner trigger survives a horizontal flip
    assert torch.equal(weak.touched_mask((3, 10, 12)).sum(), torch.tensor(36))
    untouched = ~weak.touched_mask((3, 10, 12))
    assert (out[:, :, untouched] == 0.5).all()
    # training time: +/- amplitude, clipped
    train = weak.training_trigger(x)
    assert torch.allclose(train[:, :, -1, -1], torch.tensor(0.5 + 16 / 255))
    assert torch.allclose(train[:, :, -1, -2], torch.tensor(0.5 - 16 / 255))
    # the ASR set is built with the full-amplitude trigger
    xs, _ = triggered_test_set(x, torch.tensor([1, 2]), weak, target=0)
    assert torch.equal(xs, out)


def test_bottom_right_variant_and_too_small_images() -> None:
    single = LabelConsistent(corners="bottom-right")
    assert single.touched_mask((1, 8, 8)).sum() == 9 and single.touched_mask((1, 8, 8))[-3:, -3:].all()
    with pytest.raises(ComponentParamsError, match=r"label-consistent\.corners: .* at least 6x6"):
        LabelConsistent()(torch.rand(1, 1, 5, 5))


def test_registered_with_defaults_and_listed_by_bench_plugins() -> None:
    assert get("trigger", "label-consistent").validate({}) == {
        "eps": 16 / 255,
        "steps": 100,
        "step_size": 1.5 / 255,
        "amplitude": 1.0,
        "corners": "all",
        "surrogate_epochs": 5,
        "robust_surrogate": True,
    }
    listed = CliRunner().invoke(app, ["plugins", "--kind", "trigger", "--json"])
    assert listed.exit_code == 0, listed.output
    assert "label-consistent" in {c["name"] for c in json.loads(listed.stdout)}


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"eps": 1.5}, r"label-consistent\.eps: must be in \[0, 1\]"),
        ({"steps": 0}, r"label-consistent\.steps: must be >= 1"),
        ({"amplitude": 0}, r"label-consistent\.amplitude: must be in \(0, 1\]"),
        ({"corners": "top"}, r"corners"),
        ({"epsilon": 0.1}, r"unknown parameter of trigger 'label-consistent'"),
    ],
)
def test_bad_parameters_are_refused(params: dict, match: str) -> None:
    with pytest.raises(ComponentParamsError, match=match):
        get("trigger", "label-consistent").create(**params)


# --- the scenario: modes, apply, CLI -----------------------------------------------------------------------------


def test_dirty_mode_is_refused_by_the_loader_and_by_poisoning(digits8: TensorData) -> None:
    with pytest.raises(
        ScenarioError,
        match=r"attacks\[0\]\.mode: trigger 'label-consistent' poisons in mode "
        r"clean-label only",
    ):
        resolve(tiny_scenario(attacks=[{"name": "label-consistent", "target": 0}]))
    with pytest.raises(ScenarioError, match="clean-label only"):
        poison_training_set(digits8.train_x, digits8.train_y, LabelConsistent(**FAST), 0, 0.05, seed=0)


def test_badpatches_is_planned_not_applicable_with_its_reason() -> None:
    raw = tiny_scenario(
        attacks=[
            {"name": "label-consistent", "mode": "clean-label", "apply": "badpatches", "trigger_grid": 2, "target": 0}
        ]
    )
    cells = [c for c in build(resolve(raw)).cells if c.attack]
    assert cells and all("no per-patch form" in (c.not_applicable or "") for c in cells)
    with pytest.raises(ComponentParamsError, match="use apply: image"):
        build_attack_trigger("label-consistent", {}, "badpatches", (2, 2))


def test_cli_refuses_a_bad_parameter_with_exit_2(write_scenario, tmp_path) -> None:
    path = write_scenario(tiny_scenario(attacks=[{"name": "label-consistent", "mode": "clean-label", "eps": 2.0}]))
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 2, result.output
    assert "label-consistent.eps: must be in [0, 1]" in result.output


def test_cli_run_end_to_end_produces_a_row(write_scenario, tmp_path, one_thread) -> None:
    scenario = tiny_scenario(
        name="lc",
        models=[TINY_PMOE],
        datasets=[{"name": "digits", "image_size": 8}],
        attacks=[{"name": "label-consistent", "mode": "clean-label", "target": 0, **FAST}],
        poison_rates=[0.05],
    )
    path = write_scenario(scenario)
    result = CliRunner().invoke(
        app,
        ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    records = Store(tmp_path / "runs" / "lc").records().values()
    (train,) = [r for r in records if r.kind == "train" and r.spec["attack"]]
    (ev,) = [r for r in records if r.kind == "evaluate" and r.spec["attack"]]
    assert train.spec["attack"]["name"] == "label-consistent" and train.spec["attack"]["mode"] == "clean-label"
    assert train.metrics["n_poisoned"] == round(0.05 * train.metrics["n_train"])
    assert 0.0 <= ev.metrics["asr"] <= 1.0 and ev.metrics["ba"] > 0.3
    report = next((tmp_path / "reports").rglob("*.md")).read_text()
    assert "label-consistent" in report
