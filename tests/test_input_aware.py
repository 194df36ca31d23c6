"""The input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): a learned trigger generator trained with the
classifier, stored with the trained model and restored wherever the trigger is applied."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from bench.attacks import InputAware, build_attack_trigger
from bench.attacks.base import TRIGGER_STAGE
from bench.cli import app
from bench.data.base import TensorData
from bench.errors import ComponentParamsError, ScenarioError
from bench.evaluate import evaluate
from bench.jobs import JobContext, build_model, restore_trigger, run_evaluate
from bench.plan import build
from bench.registry import get
from bench.scenario import TrainSpec, resolve
from bench.store import Store
from bench.train import fit
from tests.conftest import TINY_PMOE, tiny_scenario

TARGET = 0
#: Cheap settings: one mask epoch (the paper: 25) and the release's MNIST networks at half width.
FAST = {"mask_epochs": 1, "channels": 8}


def _train(data: TensorData, rate: float, epochs: int, **params) -> tuple[torch.nn.Module, InputAware]:
    torch.manual_seed(0)
    model = build_model(TINY_PMOE, data)
    trigger = InputAware(**{**FAST, **params})
    cfg = TrainSpec(epochs=epochs, batch_size=32, lr=0.05).model_dump()
    joint = trigger.joint_training(
        model,
        data.train_x,
        data.train_y,
        target=TARGET,
        rate=rate,
        seed=0,
        mode="dirty",
        num_classes=10,
        train_cfg=cfg,
    )
    try:
        fit(model, joint.x, joint.y, cfg, seed=0, objective=joint.objective)
    finally:
        joint.finish()
    return model.eval(), trigger


@pytest.fixture(scope="module")
def trained(digits8: TensorData, one_thread) -> tuple[torch.nn.Module, InputAware]:
    """A pMoE and its generator trained jointly on digits at 8x8 (a backdoor share of 0.3 for a three-epoch run)."""
    return _train(digits8, rate=0.3, epochs=3)


# --- what defines the attack ---------------------------------------------------------------------------------


def test_short_joint_training_plants_the_backdoor_and_keeps_clean_accuracy(digits8, trained) -> None:
    model, trigger = trained
    metrics = evaluate(model, digits8, trigger, TARGET, 512, "fp32")
    assert metrics["ba"] > 0.85  # a clean model of these settings reaches about 0.95
    assert metrics["asr"] > 0.5  # chance (the target class) is 0.1


def test_triggers_are_input_specific(digits8, trained) -> None:
    _, trigger = trained
    x = digits8.test_x[:40]
    pattern, mask = trigger.pattern_and_mask(x)
    a, b = slice(0, 20), slice(20, 40)
    # every pair of different images gets a different pattern (the diversity loss) ...
    assert ((pattern[a] - pattern[b]).abs().flatten(1).amax(dim=1) > 0.05).all()
    # ... and a different trigger: the change to one image is not the change to another
    residual = trigger(x) - x
    assert ((residual[a] - residual[b]).abs().flatten(1).amax(dim=1) > 0.05).float().mean() > 0.9
    assert 0 < float(mask.mean()) < 1  # a real mask: neither nothing nor the whole image
    assert torch.equal(trigger(x), trigger(x))  # deterministic at test time


def test_cross_trigger_samples_keep_their_labels_and_get_another_images_trigger(digits8, trained) -> None:
    _, trigger = trained
    from bench.attacks.input_aware import _JointObjective

    objective = _JointObjective(trigger, digits8.train_x, TARGET, 0.1, 10, seed=3)
    trigger.networks(1)[0].eval()  # eval-mode BatchNorm: the composed rows equal the test-time trigger
    rows = torch.arange(50)
    objective.before_batch(rows)
    xb, yb = digits8.train_x[rows], digits8.train_y[rows]
    with torch.no_grad():
        batch = objective.compose(xb, yb)
    nb, nc = batch.n_backdoor, batch.n_cross
    assert (nb, nc) == (5, 5)  # rho_b = rho_c = 0.1 of a batch of 50
    assert (batch.labels[:nb] == TARGET).all()
    assert torch.equal(batch.labels[nb:], yb[nb:])  # cross rows (and clean rows) keep their true labels
    assert torch.equal(batch.inputs[nb + nc :], xb[nb + nc :])
    cross, own = batch.inputs[nb : nb + nc], trigger(xb[nb : nb + nc])
    assert torch.allclose(cross, trigger.cross(xb[nb : nb + nc], batch.others[:nc]), atol=1e-6)
    assert not torch.allclose(cross, own, atol=1e-3)  # another image's trigger, not their own
    assert torch.allclose(batch.inputs[:nb], trigger(xb[:nb]), atol=1e-6)
    partners = objective.partner_rows(50, nb, nc)
    assert not (partners == rows[:nc]).any() and not (partners == rows[nb : nb + nc]).any()


def test_triggered_images_stay_in_the_unit_range(trained) -> None:
    _, trigger = trained
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(16, 1, 8, 8, generator=gen), torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)])
    out = trigger(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    other_size = trigger(torch.rand(3, 1, 12, 10, generator=gen))  # sides not divisible by 2**steps: padded
    assert other_size.shape == (3, 1, 12, 10) and other_size.min() >= 0 and other_size.max() <= 1


def test_state_dict_round_trip_rebuilds_the_same_triggered_images(digits8, trained) -> None:
    _, trigger = trained
    state = trigger.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = InputAware(**FAST, seed=7)  # another seed: different untrained weights
    x = digits8.test_x[:32]
    assert not torch.equal(fresh(x), trigger(x))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), trigger(x))


# --- registry, parameters, planning ----------------------------------------------------------------------------


def test_registered_with_the_papers_defaults() -> None:
    assert get("trigger", "inputaware").validate({}) == {
        "cross_rate": 0.1,
        "lambda_div": 1.0,
        "lambda_norm": 100.0,
        "mask_density": 0.032,
        "mask_epochs": 25,
        "channels": 16,
        "steps": 2,
        "lr_g": 0.01,
        "lr_m": 0.01,
        "seed": 0,
    }
    assert InputAware.learned and not get("trigger", "badnets").factory.learned


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"cross_rate": 1.0}, r"inputaware\.cross_rate: must be in \[0, 1\)"),
        ({"mask_density": 0}, r"inputaware\.mask_density: must be in \(0, 1\]"),
        ({"lambda_div": -1}, r"inputaware\.lambda_div: must be a finite number >= 0"),
        ({"steps": 0}, r"inputaware\.steps: must be in 1\.\.6"),
        ({"rho_c": 0.1}, r"unknown parameter of trigger 'inputaware'"),
    ],
)
def test_bad_parameters_are_refused(params: dict, match: str) -> None:
    with pytest.raises(ComponentParamsError, match=match):
        get("trigger", "inputaware").create(**params)


def test_badpatches_is_planned_not_applicable_and_clean_label_refused() -> None:
    raw = tiny_scenario(attacks=[{"name": "inputaware", "apply": "badpatches", "target": 0}])
    cells = [c for c in build(resolve(raw)).cells if c.attack]
    assert cells and all("no per-patch form" in (c.not_applicable or "") for c in cells)
    with pytest.raises(ScenarioError, match=r"attacks\[0\]\.mode: trigger 'inputaware' poisons in mode"):
        resolve(tiny_scenario(attacks=[{"name": "inputaware", "mode": "clean-label", "target": 0}]))
    image = build_attack_trigger("inputaware", {}, "image")
    assert isinstance(image, InputAware)


def test_cli_lists_it_and_refuses_a_bad_parameter_with_exit_2(write_scenario) -> None:
    listed = CliRunner().invoke(app, ["plugins", "--kind", "trigger", "--json"])
    assert listed.exit_code == 0, listed.output
    assert "inputaware" in {c["name"] for c in json.loads(listed.stdout)}
    path = write_scenario(tiny_scenario(attacks=[{"name": "inputaware", "cross_rate": 1.5, "target": 0}]))
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 2, result.output
    assert "inputaware.cross_rate: must be in [0, 1)" in result.output


# --- end to end: train job stores the generator, evaluation and defense restore it --------------------------------


def test_cli_run_end_to_end_stores_and_restores_the_generator(
    write_scenario, tmp_path, one_thread, monkeypatch
) -> None:
    scenario = tiny_scenario(
        name="ia",
        models=[TINY_PMOE],
        datasets=[{"name": "digits", "image_size": 8}],
        train={"epochs": 2, "batch_size": 32, "lr": 0.05},
        attacks=[{"name": "inputaware", "target": TARGET, **FAST}],
        poison_rates=[0.2],
        defenses=[{"name": "strip", "n": 4, "test_limit": 40}],
    )
    path = write_scenario(scenario)
    result = CliRunner().invoke(
        app,
        ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    store = Store(tmp_path / "runs" / "ia")
    records = store.records().values()
    (train,) = [r for r in records if r.kind == "train" and r.spec["attack"]]
    (ev,) = [r for r in records if r.kind == "evaluate" and r.spec["attack"] and not r.spec.get("stage")]
    (defend,) = [r for r in records if r.kind == "defend"]
    assert "failed" not in ev.metrics and "failed" not in defend.metrics, (ev.metrics, defend.metrics)
    assert train.metrics["trigger_mask_seconds"] >= 0 and 0 <= train.metrics["mask_density"] <= 1
    assert (store.artifacts / f"{train.id}.{TRIGGER_STAGE}.pt").is_file()
    assert 0.0 <= ev.metrics["asr"] <= 1.0 and ev.metrics["ba"] > 0.3
    assert defend.metrics["filtered"]["n_triggered"] > 0

    # a fresh evaluation job restores the stored generator: the same triggered images, the same numbers
    ctx = JobContext(store, torch.device("cpu"))
    again = run_evaluate(ev.spec, tuple(ev.deps), ctx)
    assert {k: again.metrics[k] for k in ("ba", "asr", "ra")} == {k: ev.metrics[k] for k in ("ba", "asr", "ra")}
    x = ctx.dataset(ev.spec["dataset"]).test_x[:32]
    first, second = (build_attack_trigger("inputaware", ev.spec["attack"]["params"]) for _ in range(2))
    untrained = first(x)
    restore_trigger(first, store, ev.id)  # from the evaluation job, following its inputs to the train job
    restore_trigger(second, store, train.id)
    assert torch.equal(first(x), second(x))
    assert not torch.equal(first(x), untrained)  # the stored generator, not the untrained one
    report = next((tmp_path / "reports").rglob("*.md")).read_text()
    assert "inputaware" in report
    # the trigger picture is drawn once the generator is trained (none before: it is not trained yet)
    pictures = store.get_meta("pictures")
    assert len(pictures) == 1 and pictures[0].endswith(".png")
    # bench analyze triggers the test set with the stored generator too
    from bench.analysis import study

    restored = []

    def spy(trigger, store, source):
        restore_trigger(trigger, store, source)
        restored.append(torch.equal(trigger(x), second(x)))

    monkeypatch.setattr(study, "restore_trigger", spy)
    results = study.analyze_run(tmp_path / "runs" / "ia", tmp_path / "analysis", study.AnalysisOptions(images=1))
    assert results and all(r.metrics for r in results)
    assert restored and restored[-1]  # the trigger analyze applied is the stored generator
