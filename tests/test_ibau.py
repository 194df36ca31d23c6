"""I-BAU (Zeng et al., ICLR 2022): the universal perturbation raises the loss within its L2 ball, the implicit
hypergradient is the exact total derivative on a problem with a known fixed point, and unlearning lowers
the ASR of a tiny BadNets model; plus one CLI run of a tiny digits scenario with NAD, ANP and I-BAU.

One tiny backdoored pMoE (digits at 8x8, BadNets, target 0, 10% poisoned) is trained once for the file.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from bench.attacks import BadNets
from bench.cli import app
from bench.data.base import TensorData
from bench.defenses.ibau import IBAU, implicit_hypergradient, universal_perturbation
from bench.errors import ComponentParamsError
from bench.evaluate import evaluate
from bench.models.base import BenchModel
from bench.registry import REGISTRY
from tests.conftest import TINY_PMOE, backdoored_copy, defense_cfg, defense_ctx, tiny_scenario

TARGET = 0
TINY = TINY_PMOE

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


cfg = defense_cfg


ctx_for = defense_ctx


@pytest.fixture(scope="module")
def backdoored(digits8: TensorData, badnets_digits8_state: dict[str, torch.Tensor]) -> BenchModel:
    return backdoored_copy(digits8, badnets_digits8_state)  # trained once per session (conftest)


def test_the_universal_perturbation_raises_the_loss_within_its_l2_ball(digits8, backdoored):
    ctx = ctx_for(digits8)
    batches = [(ctx.clean_x[i : i + 100], ctx.clean_y[i : i + 100]) for i in range(0, len(ctx.clean_x), 100)]
    radius = IBAU().radius((1, 8, 8))
    assert radius == pytest.approx(10 * math.sqrt(64 / 3072))  # the notebook's 10 on CIFAR-10, per-value RMS kept
    delta = universal_perturbation(backdoored, batches, 10.0, 0.001, radius)
    assert delta.shape == (1, 1, 8, 8) and float(delta.norm()) <= radius + 1e-5
    with torch.no_grad():
        own = backdoored(ctx.clean_x).argmax(1)
        clean = F.cross_entropy(backdoored(ctx.clean_x), own)
        attacked = F.cross_entropy(backdoored(ctx.clean_x + delta), own)
        noise = torch.randn(delta.shape, generator=torch.Generator().manual_seed(0))
        random = F.cross_entropy(backdoored(ctx.clean_x + noise * radius / noise.norm()), own)
    assert attacked > 5 * random and attacked > 5 * clean, (clean, random, attacked)


def test_the_implicit_hypergradient_is_the_total_derivative_through_the_fixed_point():
    """inner(d) = 0.5 |d - A theta|^2 has the fixed point d* = A theta; outer(d) = |d|^2 + c . theta, so
    d outer(d*(theta)) / d theta = 2 A^T A theta + c (the direct gradient alone would be c)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, generator=gen)
    c = torch.randn(3, generator=gen)
    theta = torch.randn(3, generator=gen, requires_grad=True)
    want = 2 * a.T @ a @ theta.detach() + c
    delta = (a @ theta).detach()  # the inner problem solved
    outer = lambda d: d.pow(2).sum() + c @ theta  # noqa: E731
    inner = lambda d: 0.5 * (d - a @ theta).pow(2).sum()  # noqa: E731
    (got,) = implicit_hypergradient([theta], delta, outer, inner, step=0.5, iters=60)
    assert torch.allclose(got, want, atol=1e-5)
    (one,) = implicit_hypergradient([theta], delta, outer, inner, step=0.5, iters=1)  # v = g: half of the way
    assert torch.allclose(one, c + 0.5 * (want - c), atol=1e-5)


def test_unlearning_lowers_the_asr_of_a_badnets_model(digits8, backdoored):
    trigger = BadNets(size=2, position="top-left")
    before = evaluate(backdoored, digits8, trigger, TARGET)
    assert before["asr"] > 0.95, before
    model = copy.deepcopy(backdoored)
    # 5 rounds of 2 batches: 10 outer steps, so a larger outer lr than the default 0.001 (CIFAR: 250 steps)
    (stage,) = IBAU(rounds=5, lr=0.01).run(model, ctx_for(digits8))
    assert stage.name == "unlearned" and stage.metrics["steps"] == 10
    assert stage.metrics["flip_first"] > 0.2  # the backdoored model has a strong universal perturbation
    model.load_state_dict(stage.state)
    after = evaluate(model.eval(), digits8, trigger, TARGET)
    assert after["asr"] < 0.2 and after["ba"] > 0.6, after  # measured: ASR 1.00 -> 0.01, BA 0.99 -> 0.74
    assert backdoored.training is False


@pytest.mark.parametrize(
    ("params", "field"),
    [({"rounds": 0}, "i-bau.rounds"), ({"fixed_point_iters": 0}, "i-bau.fixed_point_iters"),
     ({"lr": 0.0}, "i-bau.lr"), ({"perturb_lr": -1.0}, "i-bau.perturb_lr"), ({"l2_bound": 0.0}, "i-bau.l2_bound"),
     ({"portion": 0.0}, "i-bau.portion"), ({"portion": 1.5}, "i-bau.portion"), ({"budget": 0.0}, "i-bau.budget")],
)
def test_bad_params_name_the_field(params, field):
    with pytest.raises(ComponentParamsError, match=field):
        REGISTRY.get("defense", "i-bau").create(**params)


def test_registered_with_the_papers_defaults_and_threat_model():
    comp = REGISTRY.get("defense", "i-bau")
    defaults = {p.name: p.default for p in comp.params}
    assert (defaults["rounds"], defaults["fixed_point_iters"], defaults["batch_size"]) == (5, 5, 100)
    assert (defaults["lr"], defaults["l2_bound"], defaults["portion"], defaults["budget"]) == (0.001, 10.0, 0.01, 0.1)
    assert comp.factory.sees == frozenset({"model", "clean"}) and comp.factory.stages == ("unlearned",)


def test_one_cli_run_with_nad_anp_and_ibau(write_scenario, tmp_path):
    """The three defenses as plan stages of a tiny digits scenario: every stage evaluated, BA and ASR stored."""
    defenses = [
        {"name": "nad", "epochs": 1, "teacher_epochs": 1, "budget": 0.1},
        {"name": "anp", "iterations": 2, "batch_size": 16, "prune_by": "fraction", "fraction": 0.05, "budget": 0.1},
        {"name": "i-bau", "rounds": 1, "fixed_point_iters": 2, "budget": 0.1},
    ]
    digits8 = [{"name": "digits", "image_size": 8}]
    path = write_scenario(tiny_scenario(defenses=defenses, models=[TINY], datasets=digits8))
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                                 str(tmp_path / "reports")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads(runner.invoke(app, ["report", str(tmp_path / "runs" / "tiny"), "--format", "json"]).stdout)
    defended = [r for r in rows["rows"] if r["defense"] != "-" and r.get("asr_n")]
    stages = {r["defense"].rsplit(" / ", 1)[1] for r in defended}
    assert stages == {"distilled", "pruned", "unlearned"}, [r["defense"] for r in rows["rows"]]
    assert all(r["ba_n"] == 1 and r["asr_n"] == 1 for r in defended)
    report = (tmp_path / "reports" / "tiny.md").read_text()
    assert "nad" in report and "anp" in report and "i-bau" in report
