"""Neural Cleanse's defaults against the authors' code (bolunwang/backdoor): the lambda schedule
(``visualizer.py``: it starts at 0; ``gtsrb_visualize_example.py: COST_MULTIPLIER = 2``, down by its power
1.5) and the unlearning set (10% of the training data, 20% of it stamped, labels kept; Section VI.C).

One tiny backdoored pMoE (digits at 8x8, a 2x2 white BadNets square top-left, target 0, 10% poisoned) is
trained once for the file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from bench.attacks import BadNets, poison_training_set
from bench.data.base import TensorData
from bench.defenses import DefenseContext, NeuralCleanse, ReverseSpec
from bench.defenses.finetune import finetune
from bench.defenses.neural_cleanse import (
    CHECK_EVERY,
    CostSchedule,
    detect,
    reverse_engineer,
    stamp_share,
)
from bench.evaluate import evaluate
from bench.jobs import build_model, defender_data
from bench.models.base import BenchModel
from bench.registry import REGISTRY
from bench.scenario import TrainSpec
from bench.train import fit

TARGET = 0
S, F = 1.0, 0.0  # a successful and a failed check (attack success 100% and 0%)


@dataclass
class Backdoored:
    data: TensorData
    model: BenchModel
    trigger: BadNets
    cfg: dict[str, Any]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def backdoored() -> Backdoored:
    """A width-1 pMoE (2 experts, top-2 of 4 patches) with a BadNets backdoor; trained once."""
    data = REGISTRY.get("dataset", "digits").create(image_size=8)
    torch.manual_seed(0)
    model = build_model({"name": "pmoe", "width": 1, "experts": 2, "topk": 2}, data)
    trigger = BadNets(size=2, position="top-left")
    poisoned = poison_training_set(data.train_x, data.train_y, trigger, TARGET, 0.1, seed=0)
    cfg = TrainSpec(epochs=4, batch_size=64, lr=0.05).model_dump()
    fit(model, poisoned.x, poisoned.y, cfg, seed=0)
    assert evaluate(model, data, trigger, TARGET)["asr"] > 0.95  # the fixture really is backdoored
    return Backdoored(data, model, trigger, cfg)


def context(b: Backdoored, x: torch.Tensor, y: torch.Tensor) -> DefenseContext:
    return DefenseContext(clean_x=x, clean_y=y, train_cfg=b.cfg, seed=0, num_classes=b.data.num_classes,
                          trigger=b.trigger, target=TARGET, test_x=b.data.test_x, test_y=b.data.test_y)


def costs(checks: list[float], patience: int = 3, init: float = 1e-3) -> list[float]:
    schedule = CostSchedule(init, patience, success=0.99)
    return [schedule.update(rate) for rate in checks]


def test_lambda_schedule_is_the_authors_rule_over_scripted_checks() -> None:
    up, down = 2.0, 2.0**1.5  # COST_MULTIPLIER = 2; down multiplier = COST_MULTIPLIER ** 1.5
    got = costs([S, S, S, S, S, S, F, F, F, F, F, F, S, S, S])
    want = [0, 0, 1e-3,  # lambda is set on the 3rd success in a row; that check counts as the first up
            1e-3, 1e-3 * up,  # ... so two more successes double it
            1e-3 * up, 1e-3 * up, 1e-3 * up, 1e-3 * up / down,  # 3 failures in a row divide it
            1e-3 * up / down, 1e-3 * up / down, 1e-3 * up / down**2,
            1e-3 * up / down**2, 1e-3 * up / down**2, 1e-3 / down**2 * up**2]
    assert got == pytest.approx(want, rel=1e-12)


def test_lambda_starts_at_zero_until_patience_successes_in_a_row() -> None:
    assert costs([S, S, F, S, S, F, S, S]) == [0] * 8  # a failure restarts the count
    assert costs([F] * 7) == [0] * 7  # dividing 0 leaves 0: no L1 pressure until the attack works
    assert costs([F, S, S, S]) == [0, 0, 0, 1e-3]
    assert costs([0.98, 0.99, 0.99, 0.99]) == [0, 0, 0, 1e-3]  # success is "at least 0.99"
    assert costs([S], patience=1) == [2e-3]  # set, then doubled in the same check (patience 1)


def test_reverse_engineering_runs_lambda_from_zero(backdoored: Backdoored) -> None:
    x = backdoored.data.train_x[:200]
    spec = ReverseSpec(steps=15 * CHECK_EVERY, lambda_init=0.05, batch_size=16, patience=3)
    (trig,) = reverse_engineer(backdoored.model, x, [TARGET], spec, seed=0)
    rates = [rate for rate, _ in trig.log]
    lams = [lam for _, lam in trig.log]
    assert len(trig.log) == 15  # one entry per check
    first = next(i for i in range(2, 15) if all(r >= 0.99 for r in rates[i - 2 : i + 1]))
    assert lams[:first] == [0.0] * first and lams[first] == 0.05  # set at the 3rd success in a row
    steps = {round(b / a, 9) for a, b in zip(lams[first:], lams[first + 1 :], strict=False)}
    assert steps <= {1.0, 2.0, round(2.0**-1.5, 9)} and 2.0 in steps  # x2 up, / 2 ** 1.5 down, as theirs


def test_without_a_successful_run_of_checks_the_mask_norm_is_free(backdoored: Backdoored) -> None:
    """While lambda is 0 the L1 term does not enter the loss: any lambda_init gives the same run."""
    x = backdoored.data.train_x[:200]

    def run(patience: int, lambda_init: float) -> list[Any]:
        spec = ReverseSpec(steps=5 * CHECK_EVERY, batch_size=16, patience=patience, lambda_init=lambda_init)
        return reverse_engineer(backdoored.model, x, [1, 2], spec, seed=0)

    never_a, never_b = run(6, 1e-3), run(6, 10.0)  # 5 checks < patience: lambda stays 0
    assert all(lam == 0 for t in never_a for _, lam in t.log)
    assert all(torch.equal(p.mask, q.mask) and p.log == q.log for p, q in zip(never_a, never_b, strict=True))
    soon_a, soon_b = run(1, 1e-3), run(1, 10.0)  # lambda is set at the first successful check
    assert all(t.log[0][1] == 0 and t.log[1][1] > 0 for t in soon_a + soon_b)
    rates = lambda ts: [[r for r, _ in t.log] for t in ts]  # noqa: E731
    assert rates(soon_a) != rates(soon_b)  # from then on the two runs part


def test_default_budget_is_the_papers_unlearning_set(backdoored: Backdoored) -> None:
    """The defender's data (drawn as the engine draws it) is 10% of the training set; unlearning is one
    epoch on exactly it, with 20% of it stamped with the flagged class's reversed trigger, labels kept."""
    defense = NeuralCleanse(steps=100, lambda_init=0.05, batch_size=16)
    assert (defense.unlearn_share, defense.epochs) == (0.2, 1)
    x, y = defender_data(backdoored.data, defense.budget, seed=0)
    assert len(x) == round(0.10 * len(backdoored.data.train_y))
    ctx = context(backdoored, x, y)
    model = copy.deepcopy(backdoored.model)
    detected, unlearned = defense.run(model, ctx)
    assert detected.metrics["flagged_class"] == TARGET
    assert unlearned.metrics["applied"] == 1 and unlearned.metrics["n_stamped"] == round(0.2 * len(x))
    # the same unlearning by hand: the flagged trigger on 20% of the defender's images, true labels, 1 epoch
    reference = copy.deepcopy(backdoored.model)
    det = detect(copy.deepcopy(backdoored.model), x, list(range(10)), defense.spec, seed=0)
    stamped, n = stamp_share(x, [det.trigger_of(TARGET)], 0.2, ctx.generator(salt=1))
    assert n == round(0.2 * len(x)) and int((stamped != x).flatten(1).any(1).sum()) == n
    finetune(reference, ctx, 1, None, x=stamped, y=y)
    for key, value in reference.state_dict().items():
        assert torch.equal(unlearned.state[key], value), key
