"""Poisoning modes (dirty, clean-label, all-to-all): what each one poisons and relabels, the ASR it is
measured by, the scenario field that sets it (and what it refuses), job identity, and two tiny end-to-end
runs of the `bench` command on digits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bench import metrics
from bench.attacks import (
    BadNets,
    WaNet,
    asr_mask,
    backdoor_labels,
    poison_indices,
    poison_training_set,
    triggered_test_set,
)
from bench.cli import app
from bench.data.base import TensorData
from bench.errors import ScenarioError
from bench.evaluate import evaluate
from bench.plan import build
from bench.scenario import resolve
from bench.store import Store
from tests.conftest import tiny_scenario

CLASSES = 5


def data(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


TRIGGER = BadNets(size=2, position="top-left", value=1.0)


# --- poisoning ---------------------------------------------------------------------------------------------


def test_dirty_is_the_default_and_draws_as_before_modes_existed() -> None:
    x, y = data()
    default = poison_training_set(x, y, TRIGGER, target=3, rate=0.1, seed=7)
    dirty = poison_training_set(x, y, TRIGGER, target=3, rate=0.1, seed=7, mode="dirty", num_classes=CLASSES)
    assert torch.equal(default.indices, poison_indices(200, 0.1, 7))  # the pre-mode draw, bit for bit
    assert torch.equal(default.x, dirty.x) and torch.equal(default.y, dirty.y)
    assert (dirty.y[dirty.indices] == 3).all()


def test_clean_label_poisons_target_class_images_only_and_keeps_every_label() -> None:
    x, y = data()
    target = 2
    ps = poison_training_set(x, y, TRIGGER, target=target, rate=0.05, seed=1, mode="clean-label")
    assert len(ps.indices) == 10  # 5% of the *whole* set, as in every mode
    assert (y[ps.indices] == target).all()
    assert torch.equal(ps.y, y)  # no label changes
    changed = (ps.x != x).flatten(1).any(dim=1)
    assert torch.equal(changed.nonzero().flatten(), ps.indices)
    assert torch.equal(ps.x[ps.indices], TRIGGER(x[ps.indices]))
    again = poison_training_set(x, y, TRIGGER, target=target, rate=0.05, seed=1, mode="clean-label")
    other = poison_training_set(x, y, TRIGGER, target=target, rate=0.05, seed=2, mode="clean-label")
    assert torch.equal(again.indices, ps.indices) and not torch.equal(other.indices, ps.indices)


def test_clean_label_refuses_a_rate_the_target_class_cannot_supply() -> None:
    x, y = data()
    available = int((y == 4).sum())
    rate = (available + 1) / 200
    with pytest.raises(ScenarioError, match=rf"clean-label.*{available + 1} of the 200.*class 4 has {available}"):
        poison_training_set(x, y, TRIGGER, target=4, rate=rate, seed=0, mode="clean-label")
    full = poison_training_set(x, y, TRIGGER, target=4, rate=available / 200, seed=0, mode="clean-label")
    assert torch.equal(full.indices, (y == 4).nonzero().flatten())  # every image of the class, exactly


def test_clean_label_noise_mode_samples_come_from_the_rest() -> None:
    x, y = data()
    ps = poison_training_set(x, y, WaNet(noise_mode=True, cross_ratio=2.0), target=1, rate=0.05, seed=3,
                             mode="clean-label")
    assert len(ps.cross_indices) == 2 * len(ps.indices)
    assert not set(ps.cross_indices.tolist()) & set(ps.indices.tolist())
    assert torch.equal(ps.y, y)


def test_all_to_all_relabels_y_to_the_next_class() -> None:
    x, y = data()
    ps = poison_training_set(x, y, TRIGGER, target=None, rate=0.2, seed=5, mode="all-to-all", num_classes=CLASSES)
    assert torch.equal(ps.indices, poison_indices(200, 0.2, 5))  # drawn from every class, as dirty
    assert torch.equal(ps.y[ps.indices], (y[ps.indices] + 1) % CLASSES)
    rest = torch.ones(200, dtype=torch.bool)
    rest[ps.indices] = False
    assert torch.equal(ps.y[rest], y[rest]) and torch.equal(ps.x[rest], x[rest])
    assert (ps.y[ps.indices] == 0).any()  # the last class wraps round to 0
    implied = poison_training_set(x, y, TRIGGER, target=None, rate=0.2, seed=5, mode="all-to-all")
    assert torch.equal(implied.y, ps.y)  # num_classes defaults to max(y) + 1


@pytest.mark.parametrize(("mode", "target", "match"), [
    ("all-to-all", 0, "target: unused with mode all-to-all"),
    ("dirty", None, "target: must be a class index"),
    ("clean-label", None, "target: must be a class index"),
    ("two-to-one", 0, "mode: must be one of dirty, clean-label, all-to-all"),
])
def test_mode_and_target_are_checked(mode: str, target: int | None, match: str) -> None:
    x, y = data()
    with pytest.raises(ScenarioError, match=match):
        poison_training_set(x, y, TRIGGER, target=target, rate=0.1, seed=0, mode=mode)  # type: ignore[arg-type]


# --- the ASR set and the metric --------------------------------------------------------------------------


def test_asr_set_and_backdoor_labels_per_mode() -> None:
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    assert asr_mask(y, 0).tolist() == [False, True, True, True, True, False]
    assert asr_mask(y, None).all()
    assert backdoor_labels(y, 3, CLASSES).tolist() == [3] * 6
    assert backdoor_labels(y, None, CLASSES).tolist() == [1, 2, 3, 4, 0, 1]
    x = torch.rand(6, 1, 6, 6)
    xt, yt = triggered_test_set(x, y, TRIGGER, None)
    assert torch.equal(yt, y) and torch.equal(xt, TRIGGER(x))


def test_attack_success_rate_takes_per_sample_labels_and_refuses_none() -> None:
    preds = torch.tensor([1, 2, 0, 0])
    assert metrics.attack_success_rate(preds, torch.tensor([1, 2, 3, 4])) == 0.5
    assert metrics.attack_success_rate(preds, 0) == 0.5
    with pytest.raises(ValueError, match="all-to-all"):
        metrics.attack_success_rate(preds, None)  # type: ignore[arg-type]


class ReadsItsLabel(nn.Module):
    """Predicts the label written in pixel (3, 3) (value label / 10); a lit corner (the trigger) moves the
    prediction to ``(label + 1) mod C`` (``all_to_all``) or to class 0."""

    def __init__(self, all_to_all: bool) -> None:
        super().__init__()
        self.all_to_all = all_to_all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = torch.round(x[:, 0, 3, 3] * 10).long()
        lit = x[:, 0, 0, 0] == 1.0
        backdoor = (label + 1) % CLASSES if self.all_to_all else torch.zeros_like(label)
        return nn.functional.one_hot(torch.where(lit, backdoor, label), CLASSES).float()


def labelled_data() -> TensorData:
    y = torch.arange(50) % CLASSES
    x = torch.zeros(50, 1, 6, 6)
    x[:, 0, 3, 3] = y.float() / 10
    return TensorData("written", x, y, x.clone(), y.clone(), CLASSES, (0.0,), (1.0,))


def test_evaluate_measures_all_to_all_on_every_image_against_the_next_class() -> None:
    data = labelled_data()
    a2a = evaluate(ReadsItsLabel(all_to_all=True), data, TRIGGER, None)
    assert (a2a["ba"], a2a["asr"], a2a["ra"], a2a["n_asr"]) == (1.0, 1.0, 0.0, 50)
    one = evaluate(ReadsItsLabel(all_to_all=False), data, TRIGGER, None)
    assert one["asr"] == pytest.approx(1 / CLASSES)  # only the images of class C-1 land on 0 = (y + 1) mod C
    all_to_one = evaluate(ReadsItsLabel(all_to_all=False), data, TRIGGER, 0)
    assert (all_to_one["asr"], all_to_one["n_asr"]) == (1.0, 40)  # the target class is left out


# --- the scenario field, plan and job identity ---------------------------------------------------------


def attacks_of(*entries: dict) -> list[dict]:
    return resolve(tiny_scenario(attacks=list(entries))).attacks


def test_dirty_attacks_resolve_exactly_as_before() -> None:
    plain = {"name": "badnets", "size": 2, "position": "top-left", "target": 0}
    (before,) = attacks_of(plain)
    assert "mode" not in before
    assert attacks_of({**plain, "mode": "dirty"}) == [before]
    assert attacks_of({k: v for k, v in plain.items() if k != "target"}) == [before]  # target still defaults to 0
    ids = {job.id for job in build(resolve(tiny_scenario(attacks=[plain]))).jobs}
    assert ids == {job.id for job in build(resolve(tiny_scenario(attacks=[{**plain, "mode": "dirty"}]))).jobs}


def test_modes_resolve_into_the_attack_spec_and_give_their_own_jobs() -> None:
    base = {"name": "badnets", "size": 2, "position": "top-left"}
    clean, a2a = attacks_of({**base, "target": 1, "mode": "clean-label"}, {**base, "mode": "all-to-all"})
    assert (clean["mode"], clean["target"]) == ("clean-label", 1)
    assert (a2a["mode"], a2a["target"]) == ("all-to-all", None)
    grid = attacks_of({**base, "mode": {"grid": ["dirty", "clean-label"]}})
    assert [a.get("mode") for a in grid] == [None, "clean-label"]
    modes = [base, {**base, "mode": "clean-label"}, {**base, "mode": "all-to-all"}]
    plan = build(resolve(tiny_scenario(attacks=modes)))
    trains = [job for job in plan.jobs if job.kind == "train" and job.spec["attack"]]
    assert len({job.id for job in trains}) == 3


@pytest.mark.parametrize(("entry", "match"), [
    ({"mode": "clean"}, r"attacks\[0\]\.mode: must be one of dirty, clean-label, all-to-all.*got 'clean'"),
    ({"mode": "all-to-all", "target": 0}, r"attacks\[0\]\.target: unused with mode all-to-all.*remove target"),
    ({"mode": "clean-label", "objective": {"name": "qcb", "target_bits": 4}},
     r"attacks\[0\]\.mode: the qcb objective poisons dirty-label all-to-one.*mode 'clean-label'"),
])
def test_the_scenario_refuses_with_the_field_and_the_valid_values(entry: dict, match: str) -> None:
    with pytest.raises(ScenarioError, match=match):
        attacks_of({"name": "badnets", "size": 2, **entry})


# --- end to end ---------------------------------------------------------------------------------------------


def _run(write_scenario, tmp_path: Path, scenario: dict) -> Store:
    path = write_scenario(scenario)
    result = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                                      str(tmp_path / "reports")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Store(tmp_path / "runs" / scenario["name"])


def _attacked(store: Store, kind: str) -> dict:
    (record,) = [r for r in store.records().values() if r.kind == kind and r.spec["attack"]]
    return {"spec": record.spec, **record.metrics}


def test_cli_clean_label_sig_on_digits(write_scenario, tmp_path, one_thread) -> None:
    store = _run(write_scenario, tmp_path, tiny_scenario(
        name="cleanlabel", attacks=[{"name": "sinusoid", "mode": "clean-label", "target": 0}], poison_rates=[0.05]))
    train, ev = _attacked(store, "train"), _attacked(store, "evaluate")
    assert train["spec"]["attack"]["mode"] == "clean-label"
    assert train["n_poisoned"] == math.floor(0.05 * train["n_train"] + 0.5)
    assert ev["n_asr"] < ev["n_test"]  # all-to-one: the target class is left out of the ASR set
    assert 0.0 <= ev["asr"] <= 1.0 and ev["ba"] > 0.3


def test_cli_all_to_all_badnets_on_digits(write_scenario, tmp_path, one_thread) -> None:
    store = _run(write_scenario, tmp_path, tiny_scenario(
        name="alltoall", attacks=[{"name": "badnets", "size": 2, "position": "top-left", "mode": "all-to-all"}]))
    ev = _attacked(store, "evaluate")
    assert ev["spec"]["attack"]["mode"] == "all-to-all" and ev["spec"]["attack"]["target"] is None
    assert ev["n_asr"] == ev["n_test"]  # every test image is in the all-to-all ASR set
    assert "route_rate_any" in ev  # routing metrics pair the clean and triggered passes
