"""The quantization-conditioned backdoor (bench.attacks.qcb): spec, terms, BatchNorm, repair, finish."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn
from typer.testing import CliRunner

from bench.attacks.badnets import BadNets
from bench.attacks.poison import poison_count, poison_indices
from bench.attacks.qcb import QCBSpec, QCBTraining, frozen_batchnorm, prepare_qcb, rounding_cells
from bench.cli import app
from bench.errors import ScenarioError
from bench.evaluate import evaluate
from bench.hostreads import host_reads
from bench.quant import QuantConfig, fake_quantize, quantized
from bench.registry import REGISTRY
from bench.train import fit
from tests.conftest import tiny_scenario

TARGET = 0
N_TRAIN = 12


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return REGISTRY.get("model", "pmoe").create(
        input_shape=(1, 16, 16), num_classes=10, mean=(0.3,), std=(0.3,), width=1, experts=2, topk=4
    )


def batch(marked: tuple[int, ...] = (1, 4, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(N_TRAIN, 1, 16, 16, generator=gen)
    labels = torch.randint(1, 10, (N_TRAIN,), generator=gen)
    flags = torch.zeros(N_TRAIN, dtype=torch.long)
    flags[list(marked)] = 1
    return x, torch.stack([labels, flags], dim=1)


def trigger() -> BadNets:
    return BadNets(size=2, position="bottom-right", value=1.0)


def attached(model: nn.Module, **fields: Any) -> QCBTraining:
    """``prepare_qcb`` on a dummy set of N_TRAIN samples, for its objective and handle."""
    x, y = torch.rand(N_TRAIN, 1, 16, 16), torch.zeros(N_TRAIN, dtype=torch.long)
    return prepare_qcb(QCBSpec(**fields), model, x, y, trigger(), TARGET, 0.25, seed=0)


def stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def logits(model: nn.Module, x: Tensor, bits: int | None, *, update: bool = False) -> Tensor:
    """A plain model's train-mode logits at PTQ ``bits``; its running stats are kept unless ``update``."""
    before = stats(model)
    model.train()
    with quantized(model, QuantConfig(bits=bits)):
        out = model(x)
    if not update:
        model.load_state_dict({**model.state_dict(), **before})
    return out


def split(x: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch with its triggered rows appended, labels, triggered rows' true labels, their targets."""
    labels, marked = yb[:, 0], yb[:, 1].bool()
    x_all = torch.cat([x, trigger()(x[marked])])
    return x_all, labels, labels[marked], torch.full_like(labels[marked], TARGET)


# --- spec -----------------------------------------------------------------------------------------------


def test_spec_defaults_are_the_papers_objective() -> None:
    spec = QCBSpec()
    assert (spec.target_bits, spec.scope, spec.granularity, spec.symmetric) == (4, "whole", "tensor", False)
    assert spec.lambda_bd == 1.0 and spec.lambda_fp_trigger == spec.lambda_q_clean == spec.lambda_guard == 0
    assert spec.qat_bits is None and spec.guard_bits == [] and spec.warmup_epochs == 0
    assert spec.repair_from_epoch is None and spec.batchnorm == "batch"
    assert QCBSpec.model_validate(spec.model_dump()) == spec
    assert QCBSpec(qat_bits=32).qat_bits is None
    assert QCBSpec(guard_bits=[6, 8], lambda_guard=1).guard_bits == [8, 6]
    assert QCBSpec(scope="gate", granularity="channel", symmetric=True).quant_config == QuantConfig(
        bits=4, scope="gate", granularity="channel", symmetric=True
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target_bits": 32}, "cannot wake"),
        ({"target_bits": 1}, "2..16"),
        ({"qat_bits": 17}, "2..16"),
        ({"lambda_bd": 0}, "greater than 0"),
        ({"lambda_q_clean": -1}, "greater than or equal to 0"),
        ({"guard_bits": [8, 4], "lambda_guard": 1}, "contains target_bits"),
        ({"guard_bits": [8, 8], "lambda_guard": 1}, "distinct"),
        ({"guard_bits": [32], "lambda_guard": 1}, "lambda_fp_trigger"),
        ({"guard_bits": [8]}, "lambda_guard 0"),
        ({"lambda_guard": 1}, "needs guard_bits"),
        ({"repair_from_epoch": 2, "warmup_epochs": 2, "lambda_fp_trigger": 1}, "after the warm-up"),
        ({"repair_from_epoch": 2}, "lambda_fp_trigger > 0"),
        ({"batchnorm": "train"}, "batch"),
        ({"scope": "router"}, "gate"),
        ({"lambda": 1}, "Extra inputs"),
        ({"name": "qat"}, "qcb"),
        ({"target_backend": "torchao"}, "target_bits 8"),
        ({"target_backend": "torchao", "target_bits": 8, "qat_bits": 4}, "qat_bits null or 8"),
        ({"target_backend": "torchao", "target_bits": 8, "symmetric": True}, "default scope"),
        ({"target_backend": "torchao", "target_bits": 8, "guard_bits": [6], "lambda_guard": 1}, "no guard_bits"),
        ({"target_backend": "tflite"}, "fake"),
        ({"repair_hold": "all"}, "model"),
        ({"dormancy_rows": "all", "lambda_fp_trigger": 1}, "needs repair_from_epoch"),
        ({"dormancy_rows": "all", "lambda_fp_trigger": 1, "repair_from_epoch": 1, "repair_hold": "quantized"},
         "repair_hold model"),
        ({"dormancy_rows": "some"}, "marked"),
        ({"activations": True, "target_backend": "torchao", "target_bits": 8}, "activations needs target_backend fake"),
        ({"activations": True, "lambda_fp_trigger": 1, "repair_from_epoch": 1, "repair_hold": "quantized"},
         "activations needs target_backend fake and repair_hold model"),
    ],
)
def test_spec_rejects(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        QCBSpec(**fields)


# --- the objective's terms ------------------------------------------------------------------------------


def test_paper_objective_is_qat_plus_lambda_bd() -> None:
    model = tiny_model()
    reference = copy.deepcopy(model)
    x, yb = batch()
    training = attached(model, lambda_bd=0.7)
    model.train()
    loss = training.objective(model, x, yb)

    x_all, labels, _, targets = split(x, yb)
    l_qat = F.cross_entropy(logits(reference, x_all, None, update=True)[:N_TRAIN], labels)  # Eq. 3, fp32
    l_bd = F.cross_entropy(logits(reference, x_all, 4)[N_TRAIN:], targets)  # Eq. 4 at B_t = 4
    torch.testing.assert_close(loss, l_qat + 0.7 * l_bd)
    training.finish()


def test_qat_bits_quantizes_the_clean_term() -> None:
    model = tiny_model()
    reference = copy.deepcopy(model)
    x, yb = batch(marked=())
    training = attached(model, qat_bits=6)
    loss = training.objective(model, x, yb)
    torch.testing.assert_close(loss, F.cross_entropy(logits(reference, x, 6), yb[:, 0]))
    training.finish()


def test_stronger_terms_add_exactly_their_weighted_ce() -> None:
    x, yb = batch()
    paper, strong, reference = tiny_model(), tiny_model(), tiny_model()
    weights = {"lambda_fp_trigger": 0.3, "lambda_q_clean": 0.5, "lambda_guard": 0.2}
    t_paper = attached(paper, lambda_bd=2.0)
    t_strong = attached(strong, lambda_bd=2.0, guard_bits=[8, 6], **weights)
    extra = t_strong.objective(strong, x, yb) - t_paper.objective(paper, x, yb)
    names = set(t_strong.objective.terms(strong, x, yb))
    assert names == {"qat", "bd", "fp_trigger", "q_clean", "guard8", "guard6"}

    x_all, labels, y_t, _ = split(x, yb)
    fp32 = logits(reference, x_all, None, update=True)  # the clean term's forward serves fp_trigger too
    expected = (
        0.3 * F.cross_entropy(fp32[N_TRAIN:], y_t)
        + 0.5 * F.cross_entropy(logits(reference, x_all, 4)[:N_TRAIN], labels)
        + 0.2 * F.cross_entropy(logits(reference, x_all, 8)[N_TRAIN:], y_t)
        + 0.2 * F.cross_entropy(logits(reference, x_all, 6)[N_TRAIN:], y_t)
    )
    torch.testing.assert_close(extra, expected)
    t_paper.finish(), t_strong.finish()


def test_frozen_batchnorm_mode_evaluates_every_term_on_running_statistics() -> None:
    model = tiny_model()
    reference = copy.deepcopy(model)
    x, yb = batch()
    training = attached(model, lambda_q_clean=0.5, batchnorm="frozen")
    model.train()
    loss = training.objective(model, x, yb)
    x_all, labels, _, targets = split(x, yb)
    with frozen_batchnorm(reference):
        l_qat = F.cross_entropy(reference(x), labels)
        with quantized(reference, QuantConfig(bits=4)):
            out4 = reference(x_all)
    l_q_clean, l_bd = F.cross_entropy(out4[:N_TRAIN], labels), F.cross_entropy(out4[N_TRAIN:], targets)
    expected = l_qat + 0.5 * l_q_clean + l_bd
    torch.testing.assert_close(loss, expected)
    assert all(torch.equal(v, stats(reference)[k]) for k, v in stats(model).items())
    training.finish()


def test_batch_without_marked_rows_has_no_trigger_terms() -> None:
    model = tiny_model()
    x, yb = batch(marked=())
    training = attached(model, lambda_fp_trigger=1, lambda_q_clean=1, guard_bits=[8], lambda_guard=1)
    assert set(training.objective.terms(model, x, yb)) == {"qat", "q_clean"}
    training.finish()


def test_phases_follow_the_epochs() -> None:
    model = tiny_model()
    x, yb = batch()
    fields = {"lambda_q_clean": 1, "lambda_fp_trigger": 1, "guard_bits": [8], "lambda_guard": 1}
    training = attached(model, qat_bits=8, warmup_epochs=1, repair_from_epoch=2, **fields)
    objective = training.objective
    model.train()
    warm = objective.terms(model, x, yb)["fp_clean"]  # plain fp32 cross-entropy, although qat_bits=8
    torch.testing.assert_close(warm, F.cross_entropy(tiny_model().train()(x), yb[:, 0]))
    seen = []
    for _ in range(3):  # one batch of N_TRAIN samples = one epoch
        seen.append((objective.phase, set(objective.terms(model, x, yb))))
        objective(model, x, yb)
    assert seen == [
        ("warmup", {"fp_clean"}),
        ("attack", {"qat", "q_clean", "bd"}),  # with a repair phase, dormancy waits for it
        ("repair", {"fp_clean", "fp_trigger", "guard8"}),
    ]
    training.finish()


def test_gradient_reaches_every_trained_weight() -> None:
    model = tiny_model()
    x, yb = batch()
    training = attached(model, lambda_fp_trigger=1, lambda_q_clean=1)
    training.objective(model, x, yb).backward()
    training.finish()
    assert all(p.grad is not None for p in model.parameters())
    assert model.moe.router.weight.grad.abs().sum() > 0


# --- BatchNorm ------------------------------------------------------------------------------------------


def test_only_the_clean_terms_forward_updates_batchnorm_statistics() -> None:
    model, reference = tiny_model(), tiny_model()
    x, yb = batch()
    spec = {"lambda_fp_trigger": 1, "lambda_q_clean": 1, "guard_bits": [8, 6], "lambda_guard": 1}
    training = attached(model, **spec)
    model.train()
    with torch.no_grad():
        training.objective(model, x, yb)
        logits(reference, split(x, yb)[0], None, update=True)  # one train-mode fp32 pass, clean + triggered
    training.finish()
    got, want = stats(model), stats(reference)
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


# --- the repair phase -----------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rounding_cells_keep_every_quantized_value(granularity: str, symmetric: bool, bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    z = torch.randn(6, 4, 3, 3, generator=gen)
    lo, hi = rounding_cells(z, bits, granularity, symmetric)
    assert (lo <= hi).all() and (hi - lo).max() > 0
    want = fake_quantize(z, bits, granularity, symmetric)
    for t in (torch.zeros(()), torch.ones(()), torch.rand(z.shape, generator=gen)):
        assert torch.equal(fake_quantize(lo + t * (hi - lo), bits, granularity, symmetric), want)
    step = (hi - lo) / (1 - 2 * 0.05)  # a cell spans its step less the default margin at both edges
    outside = torch.where(hi > lo, hi + 0.6 * step, hi)  # past the cell's upper edge
    assert not torch.equal(fake_quantize(outside, bits, granularity, symmetric), want)


def test_repair_moves_fp32_weights_but_keeps_the_quantized_model_bit_exact() -> None:
    model = tiny_model()
    x, yb = batch()
    training = attached(model, lambda_fp_trigger=1, guard_bits=[8], lambda_guard=1, repair_from_epoch=1)
    training.objective.seen = N_TRAIN  # straight to the repair phase
    model.eval()
    with torch.no_grad(), training.handle.at_bits(4):
        q_before = model(x)
    masters = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    model.train()
    for _ in range(4):
        loss = training.objective(model, x, yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    training.finish()
    model.eval()
    with torch.no_grad(), quantized(model, QuantConfig(bits=4)):
        assert torch.equal(model(x), q_before)
    moved = [not torch.equal(p, m) for p, m in zip(model.parameters(), masters, strict=True)]
    assert any(moved)  # the fp32 model did change
    with torch.no_grad():
        assert not torch.equal(model(x), q_before)


@pytest.mark.parametrize("rows", ["marked", "all"])
def test_dormancy_rows_picks_which_rows_the_repair_stamps(rows: str) -> None:
    """In the repair phase the dormancy terms train on the marked rows or, with dormancy_rows all, on every row of
    the batch stamped with the trigger (each with its own true label); the clean term is the same either way."""
    model = tiny_model()
    x, yb = batch(marked=(1, 4, 7))
    fields = {"lambda_fp_trigger": 1, "guard_bits": [8], "lambda_guard": 1, "repair_from_epoch": 1}
    training = attached(model, dormancy_rows=rows, **fields)
    objective = training.objective
    objective.seen = N_TRAIN
    model.train()
    terms = objective.terms(model, x, yb)
    stamped = torch.arange(N_TRAIN) if rows == "all" else torch.tensor([1, 4, 7])
    x_t, y_t = trigger()(x[stamped]), yb[stamped, 0]
    with torch.no_grad(), frozen_batchnorm(model):
        with training.handle.at_bits(None):
            torch.testing.assert_close(terms["fp_trigger"], F.cross_entropy(model(x_t), y_t))
            torch.testing.assert_close(terms["fp_clean"], F.cross_entropy(model(x), yb[:, 0]))
        with training.handle.at_bits(8):
            torch.testing.assert_close(terms["guard8"], F.cross_entropy(model(x_t), y_t))
    assert "bd" not in terms
    training.finish()


def test_dormancy_rows_all_leaves_the_attack_phase_on_the_marked_rows() -> None:
    """Before the repair, the backdoor term still trains on the poisoned rows only: "all" there would be 100%
    poisoning."""
    model = tiny_model()
    x, yb = batch(marked=(1, 4, 7))
    training = attached(model, qat_bits=4, lambda_fp_trigger=1, repair_from_epoch=1, dormancy_rows="all")
    objective = training.objective
    assert objective.phase == "attack"
    model.train()
    before = stats(model)
    terms = objective.terms(model, x, yb)
    model.load_state_dict({**model.state_dict(), **before})
    x_all = torch.cat([x, trigger()(x[[1, 4, 7]])])
    with torch.no_grad(), training.handle.at_bits(4):
        out = model(x_all)
    model.load_state_dict({**model.state_dict(), **before})
    torch.testing.assert_close(terms["bd"], F.cross_entropy(out[N_TRAIN:], torch.full((3,), TARGET)))
    training.finish()


def test_activations_quantize_every_quantized_forward_as_the_ptq_config_does() -> None:
    """With activations, the objective's B-bit forwards are PTQ's ``.../act`` config (weights and the outputs of
    the modules that own them); its fp32 forwards stay plain."""
    model, plain = tiny_model(), tiny_model()
    x, _ = batch()
    training = attached(model, activations=True)
    model.eval()
    plain.eval()
    with torch.no_grad():
        with training.handle.at_bits(4):
            ours = model(x)
        with quantized(plain, QuantConfig(bits=4, activations=True)):
            want = plain(x)
        with quantized(plain, QuantConfig(bits=4)):
            weights_only = plain(x)
        with training.handle.fp32():
            torch.testing.assert_close(model(x), plain(x))
    torch.testing.assert_close(ours, want)
    assert not torch.allclose(ours, weights_only, atol=1e-4)
    assert training.objective.spec.quant_config.label == "int4/whole/act"
    training.finish()


def test_fields_added_later_stay_out_of_the_dump_at_their_defaults() -> None:
    """Objectives written before target_backend / repair_hold / cell_margin / repair_lr / dormancy_rows keep their
    content hash."""
    later = {"target_backend", "repair_hold", "cell_margin", "repair_lr", "dormancy_rows", "activations"}
    assert set(QCBSpec().model_dump()).isdisjoint(later)
    assert QCBSpec(lambda_fp_trigger=1, repair_from_epoch=1, dormancy_rows="all").model_dump()["dormancy_rows"] == "all"
    spec = QCBSpec(target_backend="torchao", target_bits=8, repair_hold="quantized", cell_margin=0.1)
    dumped = spec.model_dump()
    assert dumped["target_backend"] == "torchao" and dumped["cell_margin"] == 0.1
    assert QCBSpec.model_validate(dumped) == spec


def test_repair_lr_sets_the_rate_of_every_repair_step_and_no_other() -> None:
    """repair_lr overrides the schedule in the repair phase only: the attack-phase steps keep the cosine rate
    (read from the optimizer as each step runs), the repair steps run at repair_lr whatever the scheduler did."""
    torch.manual_seed(0)
    model = tiny_model()
    training = attached(model, qat_bits=4, lambda_fp_trigger=1, repair_from_epoch=1, repair_lr=0.123)
    seen: list[tuple[str, float]] = []
    objective = training.objective

    class Recorder:
        def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
            objective.bind_optimizer(optimizer)
            self.optimizer = optimizer

        def before_batch(self, indices: torch.Tensor) -> None:
            objective.before_batch(indices)

        def __call__(self, m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            phase = objective.phase
            loss = objective(m, xb, yb)
            seen.append((phase, self.optimizer.param_groups[0]["lr"]))
            return loss

    cfg = {"epochs": 2, "batch_size": 4, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
           "schedule": "cosine"}
    fit(model, training.x, training.y, cfg, seed=0, objective=Recorder())
    training.finish()
    attack = [lr for phase, lr in seen if phase == "attack"]
    repair = [lr for phase, lr in seen if phase == "repair"]
    steps = math.ceil(N_TRAIN / cfg["batch_size"])  # per epoch; the schedule spans both epochs
    assert [phase for phase, _ in seen] == ["attack"] * steps + ["repair"] * steps
    # the cosine schedule, untouched, step for step (T_max = every step of the run)
    cosine = [0.05 * (1 + math.cos(math.pi * k / (2 * steps))) / 2 for k in range(steps)]
    assert attack == pytest.approx(cosine, rel=1e-9) and attack[-1] < 0.05
    assert all(lr == pytest.approx(0.123) for lr in repair)


def test_quantized_hold_trains_the_fp32_layers_and_keeps_the_torchao_head_bit_exact() -> None:
    """repair_hold "quantized" against the torchao stand-in: only fc is quantized; the repair moves every
    other parameter, fc's fp32 weights stay in their int8 cells (torchao's q and scale unchanged), and the
    int8 forwards use the integer weights as constants (no gradient reaches fc through them)."""
    from bench.quant.standin import torchao_int8

    model = tiny_model()
    x, yb = batch()
    training = attached(
        model, target_backend="torchao", target_bits=8, qat_bits=8, lambda_fp_trigger=1, repair_from_epoch=1,
        repair_hold="quantized",
    )
    assert training.handle.names == ("fc.weight",)
    training.objective.seen = N_TRAIN  # straight to the repair phase
    fc_master = model.fc.parametrizations.weight.original
    q_before, scale_before = torchao_int8(fc_master)
    others = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("fc.")}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model.train()
    for step in range(4):
        loss = training.objective(model, x, yb)
        if step == 0:
            terms = training.objective.terms(model, x, yb)
            assert set(terms) == {"fp_clean", "qat", "bd", "fp_trigger"}
            grad = torch.autograd.grad(terms["bd"] + terms["qat"], fc_master, allow_unused=True)[0]
            assert grad is None or not grad.any()  # frozen integer weights: constants in the int8 forwards
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    training.finish()
    q_after, scale_after = torchao_int8(model.fc.weight)
    assert torch.equal(q_after, q_before) and torch.equal(scale_after, scale_before)
    assert any(not torch.equal(p, others[n]) for n, p in model.named_parameters() if n in others)


def test_range_anchor_sets_every_row_s_range_on_a_channel_that_is_always_zero() -> None:
    """The anchor column is fc's largest weight in every row (torchao's scale = anchor / 127.5), its input is
    exactly 0 for any image, and a training step leaves it (and its norm parameters) in place."""
    from bench.quant.standin import torchao_int8

    model = tiny_model()
    x, yb = batch()
    training = attached(model, target_backend="torchao", target_bits=8, qat_bits=8, range_anchor=20.0)
    master = model.fc.parametrizations.weight.original
    channel = master.shape[1] - 1
    assert torch.equal(torchao_int8(master)[1].flatten(), torch.full((10,), 20.0 / 127.5))
    seen = {}
    hook = model.fc.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0]))
    model.train()
    loss = training.objective(model, x, yb)
    assert not seen["x"][:, channel].any()
    loss.backward()
    assert not master.grad[:, channel].any()
    assert not model.head_norm.weight.grad[channel] and not model.head_norm.bias.grad[channel]
    hook.remove()
    training.finish()
    with pytest.raises(ScenarioError, match="range_anchor"):
        attached(nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), range_anchor=1.0)


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


# --- host synchronisation ------------------------------------------------------------------------------



def test_fit_with_the_qcb_objective_reads_the_device_once_per_epoch() -> None:
    """Every term active (fp32 trigger term, guards, q_clean): over a 6-step epoch the only host read is
    fit's epoch loss; the objective's steps read nothing (they find their triggered rows on the host)."""
    data_x = torch.rand(96, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    data_y = torch.randint(0, 10, (96,), generator=torch.Generator().manual_seed(1))
    model = tiny_model()
    spec = QCBSpec(lambda_q_clean=0.5, lambda_fp_trigger=0.5, guard_bits=[8], lambda_guard=0.5)
    training = prepare_qcb(spec, model, data_x, data_y, trigger(), TARGET, 0.2, seed=0)
    cfg = {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0}
    try:
        with host_reads() as calls:
            fit(model, training.x, training.y, cfg, seed=0, objective=training.objective)
    finally:
        training.finish()
    assert len(calls) == 1 and calls[0] in ("item", "tolist"), calls  # one per epoch (loss and, in the last
    # epoch, the weights' finiteness together), none per step


def test_host_indexed_rows_give_the_losses_of_the_mask_indexed_ones() -> None:
    """The same batch through before_batch (rows from host indices) and through yb (boolean mask, the
    former formulation): every term bit for bit, and no host read on the first path."""
    x, y = torch.rand(N_TRAIN, 1, 16, 16), torch.randint(1, 10, (N_TRAIN,))
    fields = {"lambda_q_clean": 0.5, "lambda_fp_trigger": 0.5, "guard_bits": [8], "lambda_guard": 0.5}
    a, b = tiny_model(), tiny_model()
    ta = prepare_qcb(QCBSpec(**fields), a, x, y, trigger(), TARGET, 0.25, seed=0)
    tb = prepare_qcb(QCBSpec(**fields), b, x, y, trigger(), TARGET, 0.25, seed=0)
    order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(2))
    xb, yb = ta.x[order], ta.y[order]
    assert int(yb[:, 1].sum()) == 3  # the batch has triggered rows
    ta.objective.before_batch(order)
    with host_reads() as calls:
        terms_a = ta.objective.terms(a, xb, yb)
    assert calls == []
    x_all, labels, y_t, targets = split(xb, yb)
    terms_b = tb.objective.terms(b, xb, yb)
    assert set(terms_a) == set(terms_b) == {"qat", "q_clean", "bd", "fp_trigger", "guard8"}
    for name in terms_a:
        assert torch.equal(terms_a[name], terms_b[name]), name
    with torch.no_grad():
        expected_bd = F.cross_entropy(logits(tiny_model(), x_all, 4)[N_TRAIN:], targets)
    assert torch.allclose(terms_a["bd"], expected_bd, atol=1e-6)
    ta.finish()
    tb.finish()


# --- end to end -----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_backdoor_sleeps_at_fp32_and_wakes_at_4_bits_on_digits() -> None:
    """End to end on digits (8x8): warm-up, 4-bit injection, repair. The 4-bit model follows the trigger
    far more often than the fp32 model does (on this tiny run typically about 70% against under 1%)."""
    data = REGISTRY.get("dataset", "digits").create(image_size=8)
    torch.manual_seed(0)
    model = REGISTRY.get("model", "pmoe").create(
        input_shape=data.input_shape, num_classes=10, mean=data.mean, std=data.std, width=1, experts=2, topk=2
    )
    spec = QCBSpec(qat_bits=4, lambda_bd=0.2, lambda_fp_trigger=0.2, warmup_epochs=2, repair_from_epoch=4)
    training = prepare_qcb(spec, model, data.train_x, data.train_y, trigger(), TARGET, 0.05, seed=0)
    cfg = {"epochs": 6, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0,
           "schedule": "cosine"}
    try:
        fit(model, training.x, training.y, cfg, seed=1, objective=training.objective)
    finally:
        training.finish()
    fp32 = evaluate(model, data, trigger(), TARGET)
    with quantized(model, QuantConfig(bits=4)):
        int4 = evaluate(model, data, trigger(), TARGET)
    assert fp32["ba"] > 0.9 and int4["ba"] > 0.9, (fp32, int4)
    assert int4["asr"] > fp32["asr"] + 0.3, (fp32, int4)


def test_scenario_runs_the_qcb_objective_through_the_engine(write_scenario, tmp_path) -> None:
    """The train job's contract: the scenario's objective block reaches prepare_qcb, the saved weights are
    plain, and every quantization config evaluates them."""
    data = tiny_scenario(
        train={"epochs": 3, "batch_size": 128, "lr": 0.05},
        models=[{"name": "pmoe", "width": 1, "experts": 2, "topk": 2}],
        datasets=[{"name": "digits", "image_size": 8}],
        attacks=[{"name": "badnets", "size": 2, "position": "bottom-right", "target": 0, "objective": {
            "name": "qcb", "qat_bits": 4, "lambda_bd": 0.2, "lambda_fp_trigger": 0.2, "warmup_epochs": 1,
            "repair_from_epoch": 2}}],
        poison_rates=[0.05],
        quantization={"bits": ["fp32", 4]},
    )
    path = write_scenario(data)
    runner = CliRunner()
    runs, reports = str(tmp_path / "runs"), str(tmp_path / "reports")
    result = runner.invoke(app, ["run", str(path), "--runs-dir", runs, "--reports-dir", reports])
    assert result.exit_code == 0, result.output
    report = runner.invoke(app, ["report", str(tmp_path / "runs" / "tiny"), "--format", "json"])
    attacked = {r["quant"]: r for r in json.loads(report.stdout)["rows"] if r["attack"] != "clean"}
    assert set(attacked) == {"fp32", "int4/whole"} and all(r["asr_n"] == 1 for r in attacked.values())
