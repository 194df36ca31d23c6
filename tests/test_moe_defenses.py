"""MoE-native defenses: part-finetune, expert-ablation, routing-detector.

One tiny backdoored pMoE (digits at 16x16, 4x4 patch grid, 2 experts keeping 4 patches each, a 2x2 white
BadNets square top-left, target 0, 10% poisoned) is trained once for the file; a CLI run covers the three
defenses on pmoe and dense end to end.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from bench.attacks import BadNets, poison_training_set
from bench.attacks.poison import triggered_test_set
from bench.cli import app
from bench.data.base import TensorData
from bench.defenses.base import DefenseContext
from bench.defenses.expert_ablation import ORACLE, ExpertAblation
from bench.defenses.expert_pruning import expert_silencer
from bench.defenses.moe_parts import part_parameters
from bench.defenses.part_finetune import PartFinetune
from bench.defenses.routing_detector import Routed, RoutingDetector, RoutingModel
from bench.errors import ComponentParamsError
from bench.evaluate import evaluate, predict
from bench.jobs import build_model
from bench.models.base import BenchModel
from bench.registry import REGISTRY
from bench.scenario import TrainSpec
from bench.train import fit
from tests.conftest import FP32, tiny_scenario

TARGET = 0
TINY = {"name": "pmoe", "width": 1, "experts": 2, "topk": 4}

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@dataclass
class Backdoored:
    data: TensorData
    model: BenchModel
    trigger: BadNets
    cfg: dict[str, Any]


@pytest.fixture(scope="module")
def digits16() -> TensorData:
    return REGISTRY.get("dataset", "digits").create(image_size=16)


@pytest.fixture(scope="module")
def backdoored(digits16: TensorData, one_thread: None) -> Backdoored:
    torch.manual_seed(0)
    model = build_model(TINY, digits16)
    trigger = BadNets(size=2, position="top-left")
    poisoned = poison_training_set(digits16.train_x, digits16.train_y, trigger, TARGET, 0.1, seed=0)
    cfg = TrainSpec(epochs=3, batch_size=64, lr=0.05, **FP32).model_dump()
    fit(model, poisoned.x, poisoned.y, cfg, seed=0)
    before = evaluate(model, digits16, trigger, TARGET)
    assert before["asr"] > 0.95 and before["ba"] > 0.8, before  # the fixture really is backdoored
    return Backdoored(digits16, model.eval(), trigger, cfg)


def make_ctx(b: Backdoored, n_clean: int = 72, attacked: bool = True, **kw: Any) -> DefenseContext:
    idx = torch.randperm(len(b.data.train_y), generator=torch.Generator().manual_seed(1))[:n_clean]
    return DefenseContext(
        clean_x=b.data.train_x[idx], clean_y=b.data.train_y[idx], train_cfg={**b.cfg, **kw}, seed=0,
        num_classes=b.data.num_classes, test_x=b.data.test_x, test_y=b.data.test_y,
        trigger=b.trigger if attacked else None, target=TARGET if attacked else None,
    )


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


# -------------------------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("cls", "params", "field"),
    [
        (PartFinetune, {"part": "gate"}, "part-finetune.part"),
        (PartFinetune, {"epochs": 0}, "part-finetune.epochs"),
        (PartFinetune, {"lr": 0.0}, "part-finetune.lr"),
        (ExpertAblation, {"select": "best"}, "expert-ablation.select"),
        (ExpertAblation, {"budget": 0}, "expert-ablation.budget"),
        (RoutingDetector, {"statistic": "kl"}, "routing-detector.statistic"),
        (RoutingDetector, {"frr": 1.0}, "routing-detector.frr"),
        (RoutingDetector, {"fit_share": 0.0}, "routing-detector.fit_share"),
        (RoutingDetector, {"prior": 0.0}, "routing-detector.prior"),
        (RoutingDetector, {"test_limit": 0}, "routing-detector.test_limit"),
    ],
)
def test_bad_params_name_the_defense_field_and_valid_values(cls, params, field):
    with pytest.raises(ComponentParamsError, match=field):
        cls(**params)
    with pytest.raises(ComponentParamsError, match=field.split(".")[1]):  # the registry's schema check too
        REGISTRY.get("defense", cls.name).create(**params)


def test_declarations_make_them_not_applicable_to_dense_models(digits16):
    from bench.applicability import defense_not_applicable, model_capabilities

    torch.manual_seed(0)
    dense = build_model({"name": "dense", "width": 1}, digits16)
    dense_caps, pmoe_caps = model_capabilities(dense), model_capabilities(build_model(TINY, digits16))
    for name in ("part-finetune", "expert-ablation", "routing-detector"):
        factory = REGISTRY.get("defense", name).factory
        assert factory.sees == frozenset({"model", "clean"}) and isinstance(factory.smoke, dict)
        assert defense_not_applicable({"name": name}, pmoe_caps, "pmoe") is None
        assert "needs a model with" in defense_not_applicable({"name": name}, dense_caps, "dense")
    ctx = DefenseContext(clean_x=digits16.train_x[:16], clean_y=digits16.train_y[:16], train_cfg=TrainSpec(
        epochs=1).model_dump(), seed=0, num_classes=10, test_x=digits16.test_x, test_y=digits16.test_y)
    for defense in (PartFinetune(part="rest", epochs=1), ExpertAblation(), RoutingDetector()):
        with pytest.raises(ComponentParamsError, match="dense"):  # a direct call is refused, not run wrong
            defense.run(copy.deepcopy(dense), ctx)


# ------------------------------------------------------------------------------------------ part-finetune


@pytest.mark.parametrize("part", ["router", "experts", "rest"])
def test_part_finetune_changes_exactly_the_chosen_part(backdoored, part):
    model = copy.deepcopy(backdoored.model)
    start = copy.deepcopy(model.state_dict())
    trainable = part_parameters(model, part)
    others = {"router": ("moe.router.",), "experts": ("moe.experts.",)}
    prefixes = others.get(part)
    (stage,) = PartFinetune(part=part, epochs=1).run(model, make_ctx(backdoored))
    changed = _changed(start, stage.state)
    changed_params = {k for k in changed if k in trainable}
    assert changed_params == trainable  # every parameter of the part trained
    modules = {k.rpartition(".")[0] for k in trainable}
    for key in changed - changed_params:  # the only buffers that moved are the part's BatchNorm statistics
        assert key.rpartition(".")[0] in modules, key
    if prefixes:
        assert all(k.startswith(prefixes) for k in changed)
    else:
        assert not any(k.startswith(("moe.router.", "moe.experts.")) for k in changed)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    assert stage.metrics["part"] == part and stage.metrics["trained_params"] == sum(sizes[n] for n in trainable)
    assert stage.metrics["trained_share"] == pytest.approx(stage.metrics["trained_params"] / sum(sizes.values()))
    assert all(p.requires_grad for p in model.parameters())  # the freeze is undone


# ---------------------------------------------------------------------------------------- expert ablation


def _logits(model: BenchModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_expert_ablation_silences_exactly_one_expert_and_reports_a_drop_per_expert(backdoored):
    model = copy.deepcopy(backdoored.model)
    start = copy.deepcopy(model.state_dict())
    ctx = make_ctx(backdoored)
    (stage,) = ExpertAblation().run(model, ctx)
    m = stage.metrics
    experts = len(model.moe.experts)
    assert {f"ba_drop_e{e}" for e in range(experts)} | {f"oracle_asr_drop_e{e}" for e in range(experts)} <= set(m)
    assert f"ba_drop_e{experts}" not in m
    cv = [m[f"load_cv_e{e}"] for e in range(experts)]
    chosen = m["expert"]
    assert m["select"] == "routing" and chosen == max(range(experts), key=cv.__getitem__)
    # only the chosen expert's convolution and its head BatchNorm channels differ from the attacked model
    assert _changed(start, stage.state) <= {f"moe.experts.{chosen}.conv.weight", f"moe.experts.{chosen}.conv.bias",
                                            "head_norm.weight", "head_norm.bias"}
    other = 1 - chosen
    layer = model.prunable_layers()[other]
    assert torch.equal(stage.state["head_norm.weight"][layer.span()], start["head_norm.weight"][layer.span()])
    # logits do not depend on the silenced expert's weights, and do depend on the other one's
    x = backdoored.data.test_x[:64]
    ablated = _logits(model, x)
    for e, independent in ((chosen, True), (other, False)):
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for p in probe.moe.experts[e].parameters():
                p.add_(torch.randn_like(p))
        assert torch.equal(_logits(probe, x), ablated) is independent
    # each reported drop is that of the expert silenced alone, measured on the defender's data
    trig_x, _ = triggered_test_set(ctx.clean_x, ctx.clean_y, backdoored.trigger, TARGET)
    for e in range(experts):
        alone = copy.deepcopy(backdoored.model)
        expert_silencer(alone, e).apply()
        asr = float((predict(alone, trig_x) == TARGET).float().mean())
        ba = float((predict(alone, ctx.clean_x) == ctx.clean_y).float().mean())
        assert m[f"oracle_asr_drop_e{e}"] == pytest.approx(m["oracle_asr_before"] - asr)
        assert m[f"ba_drop_e{e}"] == pytest.approx(m["ba_before"] - ba)


def test_expert_ablation_oracle_picks_the_largest_asr_drop_and_needs_an_attack(backdoored):
    ctx = make_ctx(backdoored)
    (stage,) = ExpertAblation(select="oracle").run(copy.deepcopy(backdoored.model), ctx)
    drops = [stage.metrics[f"oracle_asr_drop_e{e}"] for e in range(2)]
    assert stage.metrics["select"] == ORACLE and stage.metrics["expert"] == max(range(2), key=drops.__getitem__)
    (clean,) = ExpertAblation().run(copy.deepcopy(backdoored.model), make_ctx(backdoored, attacked=False))
    assert not any(k.startswith("oracle") for k in clean.metrics)  # no trigger, no oracle analysis
    with pytest.raises(ComponentParamsError, match="expert-ablation.select"):
        ExpertAblation(select="oracle").run(copy.deepcopy(backdoored.model), make_ctx(backdoored, attacked=False))


# --------------------------------------------------------------------------------------- routing detector


def test_selection_score_is_the_bernoulli_negative_log_likelihood():
    clean = Routed(torch.zeros(4), torch.tensor([[[1, 0]], [[1, 0]], [[1, 0]], [[0, 1]]], dtype=torch.bool),
                   torch.zeros(4, 1, 2))
    stats = RoutingModel.fit(clean, "selection", prior=1.0)
    assert stats.center.tolist() == [[4 / 6, 2 / 6]]  # (3 + 1) / (4 + 2), (1 + 1) / (4 + 2)
    score = stats.score(clean)
    typical, rare = -2 * torch.log(torch.tensor(4 / 6)), -2 * torch.log(torch.tensor(2 / 6))
    assert score[0] == pytest.approx(float(typical)) and score[3] == pytest.approx(float(rare))


@pytest.mark.parametrize("statistic", ["selection", "scores"])
def test_routing_detector_keeps_its_frr_budget_and_flags_triggered_inputs(backdoored, statistic):
    ctx = make_ctx(backdoored, n_clean=300)  # 150 images fit the statistics, 150 set the threshold
    (stage,) = RoutingDetector(statistic=statistic, frr=0.05).run(copy.deepcopy(backdoored.model), ctx)
    m = stage.metrics
    assert stage.state is None and m["n_fit"] == m["n_threshold"] == 150 and m["n_clean"] == len(ctx.test_y)
    assert abs(m["frr"] - 0.05) < 0.04, m  # held-out clean test images: near the budget
    assert m["trojan_score"] > m["clean_score"] and m["auroc"] > 0.95 and m["far"] < 0.1, m
    assert m["tpr"] == pytest.approx(1 - m["far"]) and m["asr_after_filter"] <= m["far"]


# ----------------------------------------------------------------------------------------------- the CLI


def test_cli_runs_the_three_defenses_on_pmoe_and_marks_dense_not_applicable(write_scenario, tmp_path):
    scenario = tiny_scenario(
        models=[{"name": "pmoe", "width": 1, "experts": 2, "topk": 4}, {"name": "dense", "width": 1}],
        defenses=[
            {"name": "part-finetune", "part": {"grid": ["router", "experts"]}, "epochs": 1, "budget": 0.1},
            {"name": "expert-ablation", "budget": 0.1},
            {"name": "routing-detector", "test_limit": 64, "budget": 0.1},
        ],
    )
    path = write_scenario(scenario)
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                                 str(tmp_path / "reports")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = (tmp_path / "reports" / "tiny.md").read_text()
    assert "## Defense metrics" in report and "auroc=" in report and "oracle_asr_drop_e1=" in report
    assert "trained_share=" in report
    rows = json.loads(runner.invoke(app, ["report", str(tmp_path / "runs" / "tiny"), "--format", "json"]).stdout)
    defended = [r for r in rows["rows"] if r["defense"] != "-"]
    pmoe = {r["defense"] for r in defended if r["model"].startswith("pmoe") and r["status"] != "n/a"}
    assert len(pmoe) == 3 and any("ablated" in d for d in pmoe)  # router, experts, ablated: evaluated
    assert sum("part=router" in d for d in pmoe) == 1 and sum("part=experts" in d for d in pmoe) == 1
    dense = [r for r in defended if r["model"].startswith("dense")]
    assert dense and all(r["status"] == "n/a" for r in dense)
