"""Scenario loading: schema, grid expansion, and the messages a user sees for bad input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import scenario as sc
from bench.errors import ScenarioError
from tests.conftest import tiny_scenario


def test_valid_scenario_resolves_with_defaults(write_scenario):
    resolved = sc.load(write_scenario(tiny_scenario()))
    assert resolved.name == "tiny"
    assert resolved.train[0]["optimizer"] == "sgd" and resolved.train[0]["epochs"] == 1
    attack = resolved.attacks[0]
    assert attack["name"] == "badnets" and attack["target"] == 0 and attack["apply"] == "image"
    assert attack["params"]["size"] == 2 and "value" in attack["params"]  # defaults filled in
    assert resolved.models[0]["width"] == 1


def test_grid_expands_into_concrete_components(write_scenario):
    data = tiny_scenario(
        models=[{"name": "pmoe", "width": 1, "experts": {"grid": [2, 4]}, "topk": {"grid": [2, 4]}}],
        train={"epochs": 1, "lr": {"grid": [0.1, 0.01]}},
    )
    resolved = sc.load(write_scenario(data))
    assert sorted((m["experts"], m["topk"]) for m in resolved.models) == [(2, 2), (2, 4), (4, 2), (4, 4)]
    assert sorted(t["lr"] for t in resolved.train) == [0.01, 0.1]


def test_qat_grid_trains_the_fp32_model_once(write_scenario):
    data = tiny_scenario(train={"epochs": 1, "qat_bits": {"grid": [None, 4]}, "qat_scope": {"grid": ["whole", "gate"]}})
    settings = sorted((t["qat_bits"] or 0, t["qat_scope"]) for t in sc.load(write_scenario(data)).train)
    assert settings == [(0, "whole"), (4, "gate"), (4, "whole")]


@given(st.dictionaries(st.sampled_from("abcd"), st.lists(st.integers(), min_size=1, max_size=3), max_size=3))
def test_expand_grid_is_the_cartesian_product(grids):
    entry = {k: {"grid": v} for k, v in grids.items()} | {"fixed": 1}
    out = sc.expand_grid(entry)
    expected = 1
    for values in grids.values():
        expected *= len(values)
    assert len(out) == expected
    assert all(item["fixed"] == 1 for item in out)
    for key, values in grids.items():
        assert {item[key] for item in out} == set(values)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(poison_rates=[1.5]), "poison_rates: [0] must be in (0, 1]"),
        (lambda d: d.update(poison_rates=[0.0]), "must be in (0, 1]"),
        (lambda d: d["attacks"][0].update(name="badnet"), "Did you mean 'badnets'"),
        (lambda d: d["models"][0].update(name="pmeo"), "models[0].name: unknown model 'pmeo'"),
        (lambda d: d["models"][0].update(widht=2), "models[0].widht: unknown parameter of model 'pmoe'"),
        (lambda d: d["attacks"][0].update(size="big"), "attacks[0].size"),
        (lambda d: d["attacks"][0].update(position="middle"), "attacks[0].position"),
        (lambda d: d["attacks"][0].update(apply="patches"), "attacks[0].apply"),
        (lambda d: d["train"].update(epochs=0), "train.epochs"),
        (lambda d: d["train"].update(optimiser="sgd"), "train.optimiser: unknown field"),
        (lambda d: d.update(seeds=[0, 0]), "seeds must be distinct"),
        (lambda d: d.update(colour="red"), "colour: unknown field"),
        (lambda d: d.pop("models"), "models: required field is missing"),
        (lambda d: d["models"][0].update(experts={"grid": []}), "experts.grid: must be a non-empty list"),
        (lambda d: d.update(poison_rates=[]), "poison_rates is empty"),
    ],
)
def test_bad_input_names_file_and_field(write_scenario, mutate, expected):
    data = tiny_scenario()
    mutate(data)
    path = write_scenario(data)
    with pytest.raises(ScenarioError) as info:
        sc.load(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message


def test_yaml_syntax_error_has_line_and_column(write_scenario):
    path = write_scenario("name: x\nmodels: [ {name: pmoe\n")
    with pytest.raises(ScenarioError, match=r"scenario\.yaml:\d+:\d+: YAML syntax error"):
        sc.load(path)


def test_missing_file_and_non_mapping(write_scenario, tmp_path):
    with pytest.raises(ScenarioError, match="scenario file not found"):
        sc.load(tmp_path / "nope.yaml")
    with pytest.raises(ScenarioError, match="a scenario is a YAML mapping"):
        sc.load(write_scenario("- just\n- a list\n"))


def test_shipped_scenarios_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "scenarios"
    files = sorted(root.glob("*.yaml"))
    assert files, "scenarios/ ships example files"
    for path in files:
        sc.load(path)


def test_a_whole_scenario_check_names_its_field_once():
    """A check over the whole scenario (no field location of its own) names the field in its message."""
    with pytest.raises(ScenarioError) as err:
        sc.resolve(tiny_scenario(report={"min_seeds": 3}), source="s.yaml")
    assert str(err.value).startswith("s.yaml: report.min_seeds: 3 seeds required")
