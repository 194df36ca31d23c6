"""Fast defaults: ``precision: auto`` resolves to bf16 only where the hardware computes it and never for
quantization-aware training; ``channels_last`` and ``compile`` are speed-only, so they stay out of every
job's identity (changing them recomputes nothing) and are recorded with the job's environment instead."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bench import plan as planning
from bench import precision
from bench import runner as runs
from bench import scenario as sc
from bench.cli import app
from bench.store import open_existing
from bench.train import fit
from tests.conftest import tiny_scenario

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

QCB = {"name": "qcb", "target_bits": 4, "scope": "whole", "lambda_bd": 0.2}


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend this CPU does (True) or does not (False) compute bf16 natively."""

    def pretend(native: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native)

    return pretend


def _plan(data, device: str = "cpu"):
    return planning.build(sc.resolve(data), torch.device(device))


def _trainings(plan):
    """The plan's train jobs by what they train: ``clean``, ``plain`` (an ordinary attack) or ``qcb``."""
    out = {}
    for job in plan.jobs:
        if job.kind == "train":
            attack = job.spec["attack"]
            out["clean" if attack is None else "qcb" if attack.get("objective") else "plain"] = job
    return out


def _train_specs(plan):
    return [job.spec["train"] for job in plan.jobs if job.kind in ("train", "defend")]


def test_auto_is_bf16_only_on_hardware_with_bf16_and_never_for_quantization_aware_training(cpu_bf16):
    cpu = torch.device("cpu")
    assert precision.resolve_precision("fp32", cpu) == "fp32" and precision.resolve_precision("bf16", cpu) == "bf16"
    cpu_bf16(False)
    assert precision.resolve_precision("auto", cpu) == "fp32"
    cpu_bf16(True)
    assert precision.resolve_precision("auto", cpu) == "bf16"
    assert precision.resolve_precision("auto", cpu, quantization_aware=True) == "fp32"
    assert precision.resolve_precision("bf16", cpu, quantization_aware=True) == "bf16"  # asked for: kept
    assert precision.resolve_precision("auto", torch.device("meta")) == "fp32"
    if not torch.cuda.is_available():  # a cluster head planning for GPU workers it cannot see
        assert precision.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert precision.resolve_channels_last("auto", cpu) is True
    assert precision.resolve_channels_last(False, cpu) is False
    assert precision.resolve_channels_last("auto", torch.device("meta")) is False
    assert precision.resolve_channels_last(True, torch.device("meta")) is True
    assert precision.quantization_aware({"qat_bits": 4}, None)
    assert precision.quantization_aware({"qat_bits": None}, {"name": "badnets", "objective": QCB})
    assert not precision.quantization_aware({"qat_bits": None}, {"name": "badnets"})


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo")
def test_the_cpu_probe_agrees_with_the_kernels_cpu_flags(monkeypatch):
    text = Path("/proc/cpuinfo").read_text()
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    assert precision.cpu_has_bf16() == bool(flags & precision.BF16_CPU_FLAGS)
    # the fallback for a PyTorch without its own checks reads the same flags
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert precision.cpu_has_bf16.__wrapped__() == bool(flags & precision.BF16_CPU_FLAGS)


def test_speed_only_settings_are_in_no_job_spec_but_travel_with_the_jobs():
    plan = _plan(tiny_scenario(defenses=[{"name": "fine-pruning"}]))
    assert {job.kind for job in plan.jobs} == {"train", "defend", "evaluate"}
    for job in plan.jobs:
        text = str(job.spec)
        assert "channels_last" not in text and "compile" not in text
        if job.kind in ("train", "defend"):
            assert job.settings == {"channels_last": True, "compile": False}
            assert job.runnable_spec()["train"]["channels_last"] is True
        else:
            assert job.settings == {} and job.runnable_spec() is job.spec


@settings(max_examples=12, deadline=None)
@given(channels_last=st.sampled_from([True, False, "auto"]), compile_=st.booleans(),
       eval_batch=st.integers(1, 4096))
def test_changing_a_speed_or_evaluation_setting_retrains_nothing(channels_last, compile_, eval_batch):
    base = _plan(tiny_scenario())
    train = {**tiny_scenario()["train"], "channels_last": channels_last, "compile": compile_,
             "eval_batch_size": eval_batch}
    changed = _plan(tiny_scenario(train=train))
    assert {j.id for j in changed.jobs if j.kind == "train"} == {j.id for j in base.jobs if j.kind == "train"}
    want = {"channels_last": True if channels_last == "auto" else channels_last, "compile": compile_}
    assert all(j.settings == want and j.runnable_spec()["train"]["compile"] is compile_
               for j in changed.jobs if j.kind == "train")


def test_precision_is_identity_and_auto_resolves_per_training(cpu_bf16):
    cpu_bf16(True)
    attacks = [{"name": "badnets", "size": 2, "position": "top-left", "target": 0},
               {"name": "badnets", "size": 2, "position": "top-left", "target": 0, "objective": QCB}]
    auto = _plan(tiny_scenario(attacks=attacks))
    assert {what: job.spec["train"]["precision"] for what, job in _trainings(auto).items()} == {
        "clean": "bf16", "plain": "bf16", "qcb": "fp32"}
    evals = {j.deps[0]: j.spec["precision"] for j in auto.jobs if j.kind == "evaluate"}
    assert all(evals[job.id] == job.spec["train"]["precision"] for job in _trainings(auto).values())
    bf16, fp32 = (_trainings(_plan(tiny_scenario(attacks=attacks, train={**tiny_scenario()["train"], "precision": p})))
                  for p in ("bf16", "fp32"))
    auto_ids = {what: job.id for what, job in _trainings(auto).items()}
    assert auto_ids == {"clean": bf16["clean"].id, "plain": bf16["plain"].id, "qcb": fp32["qcb"].id}
    assert len({bf16["plain"].id, fp32["plain"].id}) == 2  # the precision is part of the job's identity
    # a defense of each model trains (and is evaluated) in the precision of the model it repairs
    defended = _plan(tiny_scenario(attacks=attacks, defenses=[{"name": "fine-pruning"}]))
    by_id = {j.id: j for j in defended.jobs}
    defends = [j for j in defended.jobs if j.kind == "defend"]
    assert sorted(j.spec["train"]["precision"] for j in defends) == ["bf16", "fp32"]
    assert all(j.spec["train"]["precision"] == by_id[j.deps[0]].spec["train"]["precision"] for j in defends)
    assert all(j.spec["precision"] == by_id[j.deps[0]].spec["train"]["precision"]
               for j in defended.jobs if j.kind == "evaluate" and by_id[j.deps[0]].kind == "defend")
    qat = _plan(tiny_scenario(train={**tiny_scenario()["train"], "qat_bits": 4}))
    assert {spec["precision"] for spec in _train_specs(qat)} == {"fp32"}
    cpu_bf16(False)
    assert {spec["precision"] for spec in _train_specs(_plan(tiny_scenario(attacks=attacks)))} == {"fp32"}


def test_a_run_plans_again_when_its_device_resolves_auto_differently(cpu_bf16, write_scenario):
    from bench.smoke import smoke_plan

    # two data sets: the smoke plan keeps a subset of the jobs, so planning again must apply it again
    path = write_scenario(tiny_scenario(datasets=[{"name": "digits", "image_size": 16},
                                                  {"name": "digits", "image_size": 8}]))
    cpu_bf16(False)
    prepared = runs.prepare(path, smoke=True)
    assert prepared.plan.hardware == "cpu:fp32"
    assert prepared.for_device(torch.device("cpu")) is prepared
    cpu_bf16(True)
    again = prepared.for_device(torch.device("cpu"))
    assert again.plan.hardware == "cpu:bf16" and again.smoke
    assert {spec["precision"] for spec in _train_specs(again.plan)} == {"bf16"}
    assert len(again.plan.jobs) == len(prepared.plan.jobs)
    full = planning.build(prepared.resolved, torch.device("cpu"))
    assert len(full.jobs) > len(again.plan.jobs)
    assert [j.id for j in again.plan.jobs] == [j.id for j in smoke_plan(full).jobs]
    assert not {j.id for j in again.plan.jobs} & {j.id for j in prepared.plan.jobs}


def test_a_grid_over_a_speed_only_setting_exits_2_naming_it(write_scenario):
    path = write_scenario(tiny_scenario(train={**tiny_scenario()["train"], "compile": {"grid": [False, True]}}))
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 2
    assert "train.compile" in result.output and "speed-only" in result.output


class _Recording:
    """cross-entropy that records whether autocast was on, and can claim to be quantization-aware."""

    def __init__(self, quantization_aware: bool) -> None:
        self.quantization_aware = quantization_aware
        self.autocast: set[bool] = set()

    def __call__(self, model, xb, yb):
        self.autocast.add(torch.is_autocast_enabled("cpu"))
        return F.cross_entropy(model(xb), yb)


def _tiny_fit(cfg_precision: str, objective=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    cfg = {**sc.TrainSpec(epochs=1, batch_size=16, lr=0.1).model_dump(), "precision": cfg_precision}
    kwargs = {"objective": objective} if objective is not None else {}
    fit(model, x, y, cfg, seed=0, **kwargs)
    return model


def test_fit_resolves_auto_like_the_planner_and_keeps_quantization_aware_objectives_in_fp32(cpu_bf16):
    for native in (False, True):
        cpu_bf16(native)
        resolved = precision.resolve_precision("auto", torch.device("cpu"))
        auto, explicit = _tiny_fit("auto"), _tiny_fit(resolved)
        assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), explicit.state_dict().values(),
                                                     strict=True))
        plain, aware = _Recording(False), _Recording(True)
        _tiny_fit("auto", plain), _tiny_fit("auto", aware)
        assert plain.autocast == {native} and aware.autocast == {False}


def test_qat_in_fit_stays_fp32_under_auto(cpu_bf16):
    cpu_bf16(True)
    recording = _Recording(False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    cfg = {**sc.TrainSpec(epochs=1, batch_size=16, lr=0.1).model_dump(), "precision": "auto", "qat_bits": 4}
    fit(model, torch.rand(64, 1, 8, 8), torch.randint(0, 3, (64,)), cfg, seed=0, objective=recording)
    assert recording.autocast == {False}


def test_a_rerun_with_other_speed_settings_computes_nothing_and_records_them(write_scenario, tmp_path):
    path = write_scenario(tiny_scenario())
    dirs = {"runs_dir": tmp_path / "runs", "reports_dir": tmp_path / "reports"}
    first = runs.run(path, **dirs)
    assert len(first.summary.ran) == 4
    store = open_existing(tmp_path / "runs" / "tiny")
    env = [r.environment.get("speed_settings") for r in store.records().values() if r.kind == "train"]
    assert env == [{"channels_last": True, "compile": False}] * 2
    second = runs.run(path, **dirs, overrides=["train.channels_last=false"])
    assert second.summary.ran == [] and second.summary.skipped == 4


@pytest.mark.parametrize("value", ["maybe", 2, "on"])
def test_a_bad_channels_last_exits_2_naming_its_three_values(write_scenario, value):
    path = write_scenario(tiny_scenario(train={**tiny_scenario()["train"], "channels_last": value}))
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 2
    assert "train.channels_last: must be true, false or auto" in result.output
