"""``--set key=value`` overrides: dotted paths, YAML values, validated like the file, named in errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from bench.cli import app
from bench.errors import ScenarioError
from bench.overrides import apply_overrides, parse_override
from tests.conftest import tiny_scenario


def test_parse_dotted_and_indexed_keys_with_yaml_values():
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("poison_rates=[0.01, 0.05]") == (["poison_rates"], [0.01, 0.05])
    assert parse_override("models[0].topk=8") == (["models", 0, "topk"], 8)
    assert parse_override("models.1.name=dense") == (["models", 1, "name"], "dense")
    assert parse_override("quantization.bits=[fp32, 4]") == (["quantization", "bits"], ["fp32", 4])
    assert parse_override("train.qat_bits=null") == (["train", "qat_bits"], None)
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 0.001)


@pytest.mark.parametrize("text", ["epochs", "=3", "train..epochs=1", "train.epochs=[1,"])
def test_malformed_overrides_are_refused_with_the_text(text):
    with pytest.raises(ScenarioError, match="--set"):
        parse_override(text)


def test_apply_sets_creates_and_reaches_into_lists_without_touching_the_input():
    raw = tiny_scenario()
    out = apply_overrides(raw, ["train.epochs=4", "models[0].topk=2", "quantization.bits=[fp32, 8]"])
    assert out["train"]["epochs"] == 4 and raw["train"]["epochs"] == 1
    assert out["models"][0]["topk"] == 2 and raw["models"][0]["topk"] == 4
    assert out["quantization"] == {"bits": ["fp32", 8]} and "quantization" not in raw
    with pytest.raises(ScenarioError, match=r"models\[3\] does not exist"):
        apply_overrides(raw, ["models[3].topk=2"])
    with pytest.raises(ScenarioError, match="is not a mapping"):
        apply_overrides(raw, ["name.first=x"])


@given(st.integers(min_value=-10**6, max_value=10**6), st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_round_trip_through_an_override(number, value):
    assert apply_overrides({}, [f"a.b={number}"]) == {"a": {"b": number}}
    assert apply_overrides({}, [f"x={value!r}"])["x"] == value


def test_plan_uses_the_overrides_and_errors_name_them(write_scenario, tmp_path):
    path = write_scenario(tiny_scenario())
    runner = CliRunner()
    args = ["plan", str(path), "--json", "--runs-dir", str(tmp_path / "runs")]
    plain = json.loads(runner.invoke(app, args).stdout)
    result = runner.invoke(app, [*args, "--set", "train.epochs=2", "--set", "poison_rates=[0.1, 0.2]"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    trains = [j for j in summary["jobs_detail"] if j["kind"] == "train"]
    assert {j["spec"]["train"]["epochs"] for j in trains} == {2}
    assert len(trains) == len([j for j in plain["jobs_detail"] if j["kind"] == "train"]) + 1  # one more rate
    bad = runner.invoke(app, [*args, "--set", "train.epochs=-1"])
    assert bad.exit_code == 2
    assert "--set train.epochs=-1" in bad.output and "train.epochs" in bad.output
    assert "Traceback" not in bad.output
