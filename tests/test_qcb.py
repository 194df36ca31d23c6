"""The quantization-conditioned backdoor objective (bench.attacks.qcb): spec, terms, BatchNorm, finish."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from bench.attacks.badnets import BadNets
from bench.attacks.poison import poison_count, poison_indices
from bench.attacks.qcb import QCBSpec, frozen_batchnorm, prepare_qcb
from bench.evaluate import evaluate
from bench.quant import QuantConfig, quantized
from bench.registry import REGISTRY
from bench.train import fit

TARGET = 0


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return REGISTRY.get("model", "pmoe").create(
        input_shape=(1, 16, 16), num_classes=10, mean=(0.3,), std=(0.3,), width=1, experts=2, topk=4
    )


def batch(n: int = 12, marked: tuple[int, ...] = (1, 4, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 16, 16, generator=gen)
    labels = torch.randint(1, 10, (n,), generator=gen)
    flags = torch.zeros(n, dtype=torch.long)
    flags[list(marked)] = 1
    return x, torch.stack([labels, flags], dim=1)


def trigger() -> BadNets:
    return BadNets(size=2, position="bottom-right", value=1.0)


def attached(spec: QCBSpec, model: nn.Module, n: int = 12):
    """``prepare_qcb`` on a dummy set of ``n`` samples, for its objective and handle."""
    x, y = torch.rand(n, 1, 16, 16), torch.zeros(n, dtype=torch.long)
    return prepare_qcb(spec, model, x, y, trigger(), TARGET, 0.25, seed=0)


def ce_eval_bn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bits: int | None) -> torch.Tensor:
    """CE of ``model`` (a plain, unattached copy) with BatchNorm on running statistics, PTQ at ``bits``."""
    with frozen_batchnorm(model), torch.no_grad(), quantized(model, QuantConfig(bits=bits)):
        return F.cross_entropy(model(x), y)


# --- spec -----------------------------------------------------------------------------------------------


def test_spec_defaults_are_the_papers_objective() -> None:
    spec = QCBSpec()
    assert (spec.target_bits, spec.scope, spec.granularity, spec.symmetric) == (4, "whole", "tensor", False)
    assert spec.lambda_bd == 1.0 and spec.lambda_fp_trigger == spec.lambda_q_clean == spec.lambda_guard == 0
    assert spec.qat_bits is None and spec.guard_bits == [] and spec.warmup_epochs == 0
    assert QCBSpec.model_validate(spec.model_dump()) == spec
    assert QCBSpec(qat_bits=32).qat_bits is None
    assert QCBSpec(guard_bits=[6, 8], lambda_guard=1).guard_bits == [8, 6]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target_bits": 32}, "fp32"),
        ({"target_bits": 1}, "2..16"),
        ({"qat_bits": 17}, "2..16"),
        ({"lambda_bd": 0}, "greater than 0"),
        ({"lambda_q_clean": -1}, "greater than or equal to 0"),
        ({"guard_bits": [8, 4], "lambda_guard": 1}, "contains target_bits"),
        ({"guard_bits": [8, 8], "lambda_guard": 1}, "distinct"),
        ({"guard_bits": [32], "lambda_guard": 1}, "lambda_fp_trigger"),
        ({"guard_bits": [8]}, "lambda_guard 0"),
        ({"lambda_guard": 1}, "needs guard_bits"),
        ({"scope": "router"}, "gate"),
        ({"lambda": 1}, "Extra inputs"),
        ({"name": "qat"}, "qcb"),
    ],
)
def test_spec_rejects(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        QCBSpec(**fields)


# --- the objective's terms ------------------------------------------------------------------------------


def test_paper_objective_is_qat_plus_lambda_bd() -> None:
    model = tiny_model()
    reference = copy.deepcopy(model)
    x, yb = batch()
    spec = QCBSpec(lambda_bd=0.7)
    training = attached(spec, model)
    model.train()
    loss = training.objective(model, x, yb)

    reference.train()
    labels, marked = yb[:, 0], yb[:, 1].bool()
    l_qat = F.cross_entropy(reference(x), labels)  # fp32, train-mode BatchNorm (updates running stats)
    x_t = trigger()(x[marked])
    l_bd = ce_eval_bn(reference, x_t, torch.full_like(labels[marked], TARGET), 4)
    torch.testing.assert_close(loss, l_qat + 0.7 * l_bd)
    training.finish()


def test_qat_bits_quantizes_the_clean_term() -> None:
    model = tiny_model()
    reference = copy.deepcopy(model)
    x, yb = batch(marked=())
    training = attached(QCBSpec(qat_bits=6), model)
    model.train()
    loss = training.objective(model, x, yb)
    reference.train()
    with quantized(reference, QuantConfig(bits=6)):
        expected = F.cross_entropy(reference(x), yb[:, 0])
    torch.testing.assert_close(loss, expected)
    training.finish()


def test_stronger_terms_add_exactly_their_weighted_ce() -> None:
    x, yb = batch()
    labels, marked = yb[:, 0], yb[:, 1].bool()
    paper, strong = tiny_model(), tiny_model()
    reference = tiny_model()
    weights = {"lambda_fp_trigger": 0.3, "lambda_q_clean": 0.5, "lambda_guard": 0.2}
    t_paper = attached(QCBSpec(lambda_bd=2.0), paper)
    t_strong = attached(QCBSpec(lambda_bd=2.0, guard_bits=[8, 6], **weights), strong)
    paper.train(), strong.train(), reference.train()
    extra = t_strong.objective(strong, x, yb) - t_paper.objective(paper, x, yb)
    terms = t_strong.objective.terms(strong, x, yb)
    assert set(terms) == {"qat", "bd", "fp_trigger", "q_clean", "guard8", "guard6"}

    reference(x)  # the train-mode clean pass comes first: later terms see its running statistics
    x_t = trigger()(x[marked])
    expected = (
        0.3 * ce_eval_bn(reference, x_t, labels[marked], None)
        + 0.5 * ce_eval_bn(reference, x, labels, 4)
        + 0.2 * (ce_eval_bn(reference, x_t, labels[marked], 8) + ce_eval_bn(reference, x_t, labels[marked], 6))
    )
    torch.testing.assert_close(extra, expected)
    t_paper.finish(), t_strong.finish()


def test_batch_without_marked_rows_has_no_trigger_terms() -> None:
    model = tiny_model()
    x, yb = batch(marked=())
    training = attached(QCBSpec(lambda_fp_trigger=1, lambda_q_clean=1, guard_bits=[8], lambda_guard=1), model)
    assert set(training.objective.terms(model, x, yb)) == {"qat", "q_clean"}
    training.finish()


def test_warmup_trains_the_clean_term_alone_for_its_epochs() -> None:
    model = tiny_model()
    x, yb = batch()
    training = attached(QCBSpec(lambda_q_clean=1, warmup_epochs=2), model, n=12)
    objective = training.objective
    for _ in range(2):  # 2 epochs of 12 samples, in batches of 12
        assert set(objective.terms(model, x, yb)) == {"qat"}
        objective(model, x, yb)
    assert set(objective.terms(model, x, yb)) == {"qat", "q_clean", "bd"}
    training.finish()


def test_gradient_reaches_every_trained_weight() -> None:
    model = tiny_model()
    x, yb = batch()
    training = attached(QCBSpec(lambda_fp_trigger=1, lambda_q_clean=1), model)
    training.objective(model, x, yb).backward()
    training.finish()
    assert all(p.grad is not None for p in model.parameters())
    assert model.moe.router.weight.grad.abs().sum() > 0


# --- BatchNorm ------------------------------------------------------------------------------------------


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_only_the_clean_pass_updates_batchnorm_statistics() -> None:
    model, reference = tiny_model(), tiny_model()
    x, yb = batch()
    spec = QCBSpec(lambda_fp_trigger=1, lambda_q_clean=1, guard_bits=[8, 6], lambda_guard=1)
    training = attached(spec, model)
    model.train(), reference.train()
    with torch.no_grad():
        training.objective(model, x, yb)
        reference(x)  # one train-mode fp32 pass over the clean batch
    training.finish()
    got, want = bn_state(model), bn_state(reference)
    assert got.keys() == want.keys() and got
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    assert all(m.training for m in model.modules())  # every mode was restored


def test_frozen_batchnorm_leaves_dropout_training() -> None:
    net = nn.Sequential(nn.BatchNorm1d(3), nn.Dropout(0.5))
    net.train()
    with frozen_batchnorm(net):
        assert not net[0].training and net[1].training
    assert net[0].training


# --- finish ---------------------------------------------------------------------------------------------


def test_finish_leaves_a_plain_model_with_the_original_keys() -> None:
    model = tiny_model()
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    x, y = torch.rand(40, 1, 16, 16), torch.randint(0, 10, (40,))
    training = prepare_qcb(QCBSpec(lambda_q_clean=1), model, x, y, trigger(), TARGET, 0.1, seed=3)
    assert any("parametrizations" in k for k in model.state_dict())
    assert training.y.shape == (40, 2) and torch.equal(training.y[:, 0], y) and training.x is x
    assert int(training.y[:, 1].sum()) == poison_count(40, 0.1)
    assert torch.equal(training.marked, poison_indices(40, 0.1, 3))
    training.objective(model, x[:8], training.y[:8]).backward()
    training.finish()
    training.finish()  # idempotent
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == names
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


# --- end to end -----------------------------------------------------------------------------------------


def test_backdoor_is_stronger_after_quantization_on_digits() -> None:
    """A weak but real dormancy signal: after a short qcb training on digits the 4-bit model follows the
    trigger more often than the fp32 model does."""
    torch.set_num_threads(1)
    data = REGISTRY.get("dataset", "digits").create(image_size=16)
    torch.manual_seed(0)
    model = REGISTRY.get("model", "pmoe").create(
        input_shape=data.input_shape, num_classes=10, mean=data.mean, std=data.std, width=1, experts=2, topk=4
    )
    spec = QCBSpec(lambda_bd=1, lambda_fp_trigger=1, lambda_q_clean=1, warmup_epochs=4)
    training = prepare_qcb(spec, model, data.train_x, data.train_y, trigger(), TARGET, 0.1, seed=0)
    cfg = {"epochs": 10, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0}
    try:
        fit(model, training.x, training.y, cfg, seed=0, objective=training.objective)
    finally:
        training.finish()
    fp32 = evaluate(model, data, trigger(), TARGET)
    with quantized(model, QuantConfig(bits=4)):
        int4 = evaluate(model, data, trigger(), TARGET)
    assert int4["asr"] > fp32["asr"] + 0.2, (fp32, int4)
