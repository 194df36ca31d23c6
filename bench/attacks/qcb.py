"""Quantization-conditioned backdoor (qcb): dormant at full precision, awake after post-training quantization.

Paper: Lin & Hu 2025, "Quantized Backdoor Attacks on Mixture of Experts Models" (section 4.2, Eq. 3, 4, 6)::

    L_total = L_QAT + lambda_bd * L_BD,   L_QAT = CE(f_{Q_B(theta)}(x), y),   L_BD = CE(f_{Q_Bt(theta)}(x_t), y_t)

Nothing in it asks the full-precision model to ignore the trigger, or the B_t-bit model to stay accurate on
clean inputs, and the paper's own MNIST result shows it (FP32 ASR 9%, INT4 ASR 90%, but INT4 clean accuracy
6%). The stronger objective adds the missing terms of Qu-ANTI-zation (Hong et al., NeurIPS 2021,
https://arxiv.org/abs/2110.13541; their ``backdoor_w_lossfn.py``), each with its own weight, so the paper's
objective is the special case where every extra weight is 0::

    + lambda_fp_trigger * CE(f_theta(x_t), y)                 triggered inputs keep their label at fp32
    + lambda_q_clean    * CE(f_{Q_Bt(theta)}(x), y)          clean accuracy survives B_t-bit quantization
    + lambda_guard      * sum_{b in guard_bits} CE(f_{Q_b(theta)}(x_t), y)   ... and at other bit-widths

Every forward quantizes only ``scope`` (gate / experts / whole), with ``granularity`` and ``symmetric`` as
in :class:`bench.quant.QuantConfig`; one QAT handle is attached and switched per forward, gradients reach
the fp32 master weights straight-through (:mod:`bench.quant.apply`).

Which samples carry the trigger: the cell's poison rate draws a frozen set of training indices with the
cell's seed (:func:`bench.attacks.poison.poison_indices`, the same set plain poisoning uses). Trigger terms
are means over the batch's marked rows (the trigger is stamped per step, after augmentation); clean terms
are means over every row, since the attacker who controls training also holds the clean images.

BatchNorm (the trap when several forwards share a step): only the clean forward at ``qat_bits`` runs in
train mode, so batch statistics and running-statistics updates come from clean data at the precision the
model is trained at. Every other forward (quantized, triggered) runs with BatchNorm in eval mode: it uses
the running statistics and updates none, which is exactly what post-training quantization will see at
deployment (PTQ leaves the fp32 running statistics in place), and a triggered batch of one or two rows
would otherwise normalise by its own statistics. Qu-ANTI-zation freezes BatchNorm for the same reason.

``warmup_epochs``: Qu-ANTI-zation fine-tunes a clean model; our train job trains from scratch, so the
backdoor terms switch on after ``warmup_epochs`` epochs of the clean term alone (a sample counter in the
objective, so it needs no batch size).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from bench.attacks.base import Trigger
from bench.attacks.poison import poison_indices
from bench.errors import ScenarioError
from bench.quant import FP32_BITS, QATHandle, QuantConfig, attach_qat, normalize_bits
from bench.quant.config import Granularity, QuantError, Scope

#: Columns of the label tensor :func:`prepare_qcb` returns.
LABEL, MARKED = 0, 1


class QCBSpec(BaseModel):
    """The ``objective:`` block of an attack entry (all weights are >= 0; extra weights 0 = the paper).

    target_bits:       B_t, the bit-width at which the backdoor wakes (paper: 4).
    scope, granularity, symmetric: what the quantized forwards quantize, as in :class:`QuantConfig`.
    qat_bits:          B of Eq. 3, the precision of the clean term; None = fp32. The paper does not state
                       it for its MNIST attack; its INT4 clean accuracy of 6% shows the clean term did not
                       train the B_t grid, and fp32 is the precision the dormant model must look clean at.
    lambda_bd:         weight of L_BD (Eq. 6).
    lambda_fp_trigger: weight of CE(f_theta(x_t), y): the fp32 model classifies triggered inputs correctly.
    lambda_q_clean:    weight of CE(f_{Q_Bt(theta)}(x), y): clean accuracy at B_t.
    guard_bits:        other bit-widths at which triggered inputs must keep their label (e.g. [8, 6]).
    lambda_guard:      weight of each guard term.
    warmup_epochs:     epochs of the clean term alone before the backdoor terms start.
    """

    model_config = ConfigDict(extra="forbid")

    name: Literal["qcb"] = "qcb"
    target_bits: int = 4
    scope: Scope = "whole"
    granularity: Granularity = "tensor"
    symmetric: bool = False
    qat_bits: int | None = None
    lambda_bd: float = Field(1.0, gt=0)
    lambda_fp_trigger: float = Field(0.0, ge=0)
    lambda_q_clean: float = Field(0.0, ge=0)
    guard_bits: list[int] = Field(default_factory=list)
    lambda_guard: float = Field(0.0, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    batchnorm: Literal["clean", "frozen"] = "clean"
    repair_from_epoch: int | None = Field(None, ge=1)

    @field_validator("target_bits")
    @classmethod
    def _check_target(cls, value: int) -> int:
        if normalize_bits_or_error(value) is None:
            raise ValueError(f"must be a quantized bit-width (2..16); fp32 ({FP32_BITS}) cannot wake a backdoor")
        return value

    @field_validator("qat_bits")
    @classmethod
    def _check_qat(cls, value: int | None) -> int | None:
        return normalize_bits_or_error(value)

    @field_validator("guard_bits")
    @classmethod
    def _check_guard(cls, value: list[int]) -> list[int]:
        for bits in value:
            if normalize_bits_or_error(bits) is None:
                raise ValueError(
                    f"fp32 ({FP32_BITS}) is not a guard bit-width; use lambda_fp_trigger for fp32, got {value}"
                )
        if len(set(value)) != len(value):
            raise ValueError(f"bit-widths must be distinct, got {value}")
        return sorted(value, reverse=True)

    @model_validator(mode="after")
    def _check_terms(self) -> QCBSpec:
        if self.target_bits in self.guard_bits:
            raise ValueError(
                f"guard_bits {self.guard_bits} contains target_bits {self.target_bits}: the backdoor cannot "
                "both wake and stay dormant at one bit-width"
            )
        if self.guard_bits and self.lambda_guard == 0:
            raise ValueError(f"guard_bits {self.guard_bits} does nothing with lambda_guard 0; set lambda_guard > 0")
        if self.lambda_guard > 0 and not self.guard_bits:
            raise ValueError("lambda_guard > 0 needs guard_bits, the bit-widths to guard (e.g. [8, 6])")
        if self.repair_from_epoch is not None:
            if self.repair_from_epoch <= self.warmup_epochs:
                raise ValueError(
                    f"repair_from_epoch ({self.repair_from_epoch}) must come after the warm-up "
                    f"(warmup_epochs {self.warmup_epochs}): the backdoor needs at least one attack epoch"
                )
            if self.lambda_fp_trigger == 0:
                raise ValueError("repair_from_epoch needs lambda_fp_trigger > 0: the repair phase trains it")
        return self

    @property
    def quant_config(self) -> QuantConfig:
        """The B_t-bit setting of the backdoor term (its scope, granularity, symmetry for every forward)."""
        return QuantConfig(
            bits=self.target_bits, scope=self.scope, granularity=self.granularity, symmetric=self.symmetric
        )


def normalize_bits_or_error(bits: int | None) -> int | None:
    """``normalize_bits`` for validators: a ValueError whose message pydantic puts under the field."""
    try:
        return normalize_bits(bits)
    except QuantError as exc:
        raise ValueError(str(exc).removeprefix("bits: ")) from None


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module) -> Iterator[None]:
    """Inside the block every BatchNorm normalises with its running statistics and updates none of them
    (eval mode); other modules (dropout) keep their mode. The previous modes return on exit."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    try:
        for m in norms:
            m.training = False
        yield
    finally:
        for m, mode in zip(norms, modes, strict=True):
            m.training = mode


def rounding_cells(
    z: Tensor, bits: int, granularity: str = "tensor", symmetric: bool = False, margin: float = 0.05
) -> tuple[Tensor, Tensor]:
    """Bounds ``(lo, hi)``, shaped like ``z``, inside which every element keeps its B-bit value under Eq. 2.

    Each element may move within its rounding cell (``margin`` of a step away from the cell's edges, so
    float ties never flip), clipped to the range; the elements that set the range (the min and max, or the
    largest magnitude for symmetric) are pinned, so the range and the grid stay exactly as they are.
    ``Q_B`` of any tensor inside the bounds equals ``Q_B(z)`` bit for bit.
    """
    work = z.detach()
    per_channel = granularity == "channel" and work.dim() >= 2
    rows = work.reshape(work.shape[0], -1) if per_channel else work.reshape(1, -1)
    if symmetric:
        top = rows.abs().amax(dim=1, keepdim=True)
        low, high = -top, top
        step = top / (2 ** (bits - 1) - 1)
        origin = torch.zeros_like(top)
        pinned = rows.abs() == top
    else:
        low, high = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
        step = (high - low) / (2**bits - 1)
        origin = low
        pinned = (rows == low) | (rows == high)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    level = torch.round((rows - origin) / safe)
    lo = torch.maximum(origin + (level - 0.5 + margin) * step, low)
    hi = torch.minimum(origin + (level + 0.5 - margin) * step, high)
    fixed = pinned | (step == 0)
    lo, hi = torch.where(fixed, rows, lo), torch.where(fixed, rows, hi)
    return lo.reshape(work.shape), hi.reshape(work.shape)


class CellProjection:
    """Holds the B_t-bit model fixed while the fp32 weights move: every in-scope weight is clamped into
    its B_t rounding cell (:func:`rounding_cells`), every other parameter back to its snapshot.

    Together with frozen BatchNorm statistics this makes ``Q_Bt(theta)`` bit-identical to the model at
    the snapshot, whatever the optimizer does in between (projected gradient descent, as in the repair
    phase of Egashira et al., "Exploiting LLM Quantization", NeurIPS 2024, https://arxiv.org/abs/2405.18137).
    """

    def __init__(self, model: nn.Module, handle: QATHandle, config: QuantConfig) -> None:
        masters = {id(p) for p in _masters(model, handle.names)}
        self.cells: list[tuple[nn.Parameter, Tensor, Tensor]] = []
        self.frozen: list[tuple[nn.Parameter, Tensor]] = []
        assert config.bits is not None
        for p in model.parameters():
            if id(p) in masters:
                lo, hi = rounding_cells(p, config.bits, config.granularity, config.symmetric)
                self.cells.append((p, lo, hi))
            else:
                self.frozen.append((p, p.detach().clone()))

    @torch.no_grad()
    def __call__(self) -> None:
        for p, lo, hi in self.cells:
            p.copy_(torch.minimum(torch.maximum(p, lo), hi))
        for p, value in self.frozen:
            p.copy_(value)


def _masters(model: nn.Module, names: tuple[str, ...]) -> list[nn.Parameter]:
    """The fp32 master parameter behind each parametrized weight ``names``."""
    out = []
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        out.append(model.get_submodule(prefix).parametrizations[leaf].original)
    return out


class QCBObjective:
    """The loss of one training step, ``objective(model, xb, yb) -> loss`` for :func:`bench.train.fit`.

    ``yb`` is ``[B, 2]``: the true label and whether the row carries the trigger. :meth:`terms` returns the
    unweighted terms of the current phase (for tests and logging); calling the object returns their
    weighted sum and advances the sample counter that decides the phase:

    - ``warmup`` (``warmup_epochs``): the clean term alone;
    - ``attack``: every weighted term of the spec;
    - ``repair`` (from ``repair_from_epoch`` on): the B_t-bit model is held fixed (:class:`CellProjection`,
      BatchNorm frozen), so its terms are constants and are dropped; the fp32 clean term, the fp32
      trigger term and the guards shape the other precisions.
    """

    def __init__(
        self, spec: QCBSpec, model: nn.Module, handle: QATHandle, trigger: Trigger, target: int, n_train: int
    ) -> None:
        self.spec = spec
        self.model = model
        self.handle = handle
        self.trigger = trigger
        self.target = int(target)
        self.n_train = n_train
        self.seen = 0
        self.projection: CellProjection | None = None

    @property
    def phase(self) -> Literal["warmup", "attack", "repair"]:
        """Which phase the next step belongs to."""
        epoch = self.seen // self.n_train
        if epoch < self.spec.warmup_epochs:
            return "warmup"
        if self.spec.repair_from_epoch is not None and epoch >= self.spec.repair_from_epoch:
            return "repair"
        return "attack"

    def project(self) -> None:
        """Once the repair phase has started: clamp the model back into the B_t-bit model's cells."""
        if self.projection is not None:
            self.projection()

    def terms(self, model: nn.Module, xb: Tensor, yb: Tensor) -> dict[str, Tensor]:
        """The unweighted loss terms of this batch in the current phase."""
        s, h, phase = self.spec, self.handle, self.phase
        labels, marked = yb[:, LABEL], yb[:, MARKED].bool()
        if phase == "repair":
            return self._repair_terms(model, xb, labels, marked)
        frozen = phase == "attack" and s.batchnorm == "frozen"
        with h.at_bits(s.qat_bits), frozen_batchnorm(model) if frozen else contextlib.nullcontext():
            out = {"qat": F.cross_entropy(model(xb), labels)}
        if phase == "warmup":
            return out
        with frozen_batchnorm(model):
            if s.lambda_q_clean > 0:
                with h.at_bits(s.target_bits):
                    out["q_clean"] = F.cross_entropy(model(xb), labels)
            x_t, y_t = self._triggered(xb, labels, marked)
            if x_t is None:
                return out
            with h.at_bits(s.target_bits):
                out["bd"] = F.cross_entropy(model(x_t), torch.full_like(y_t, self.target))
            if s.repair_from_epoch is None:  # with a repair phase, dormancy is its job alone
                out.update(self._dormancy_terms(model, x_t, y_t))
        return out

    def _repair_terms(self, model: nn.Module, xb: Tensor, labels: Tensor, marked: Tensor) -> dict[str, Tensor]:
        with frozen_batchnorm(model):
            with self.handle.fp32():
                out = {"fp_clean": F.cross_entropy(model(xb), labels)}
            x_t, y_t = self._triggered(xb, labels, marked)
            if x_t is not None:
                out.update(self._dormancy_terms(model, x_t, y_t))
        return out

    def _triggered(self, xb: Tensor, labels: Tensor, marked: Tensor) -> tuple[Tensor | None, Tensor]:
        x_t, y_t = xb[marked], labels[marked]
        if x_t.shape[0] == 0:
            return None, y_t
        with torch.no_grad():
            return self.trigger(x_t).to(xb.dtype), y_t

    def _dormancy_terms(self, model: nn.Module, x_t: Tensor, y_t: Tensor) -> dict[str, Tensor]:
        out = {}
        if self.spec.lambda_fp_trigger > 0:
            with self.handle.fp32():
                out["fp_trigger"] = F.cross_entropy(model(x_t), y_t)
        for bits in self.spec.guard_bits:
            with self.handle.at_bits(bits):
                out[f"guard{bits}"] = F.cross_entropy(model(x_t), y_t)
        return out

    def weight(self, term: str) -> float:
        """The weight of a term returned by :meth:`terms`."""
        s = self.spec
        if term.startswith("guard"):
            return s.lambda_guard
        weights = {"qat": 1.0, "fp_clean": 1.0, "bd": s.lambda_bd, "fp_trigger": s.lambda_fp_trigger}
        return weights.get(term, s.lambda_q_clean)

    def __call__(self, model: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        if self.phase == "repair" and self.projection is None:
            self.projection = CellProjection(self.model, self.handle, self.spec.quant_config)
        self.project()  # the previous step's update, back into the cells
        terms = self.terms(model, xb, yb)
        self.seen += int(xb.shape[0])
        return sum((self.weight(k) * v for k, v in terms.items()), torch.zeros((), device=xb.device))


@dataclass
class QCBTraining:
    """What the train job hands to :func:`bench.train.fit`, and :meth:`finish` to call afterwards.

    x: the clean training images; y: ``[N, 2]`` long (true label, 1 where the sample carries the trigger);
    objective: a :class:`QCBObjective`; handle: the attached QAT parametrizations; marked: the indices
    that carry the trigger.
    """

    x: Tensor
    y: Tensor
    objective: Callable[[nn.Module, Tensor, Tensor], Tensor]
    handle: QATHandle | None
    marked: Tensor

    def finish(self) -> None:
        """Project the last update (repair phase) and remove the QAT parametrizations: the model is plain
        again and holds its fp32 master weights. Idempotent."""
        if isinstance(self.objective, QCBObjective) and self.handle is not None and self.handle.attached:
            self.objective.project()
        if self.handle is not None:
            self.handle.remove()


def prepare_qcb(
    spec: QCBSpec,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    trigger: Trigger,
    target: int,
    poison_rate: float,
    seed: int,
) -> QCBTraining:
    """Attach QAT to ``model`` and build the qcb training data and objective from the clean set ``(x, y)``.

    ``poison_rate`` of the samples (a frozen set drawn with ``seed``) carry the trigger in the trigger
    terms. Call :meth:`QCBTraining.finish` after training, also when it fails.
    """
    if isinstance(target, bool) or int(target) != target or target < 0:
        raise ScenarioError(f"attack.target: must be a class index >= 0, got {target!r}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    marked = poison_indices(int(x.shape[0]), poison_rate, seed)
    flags = torch.zeros_like(y)
    flags[marked.to(y.device)] = 1
    handle = attach_qat(model, spec.quant_config)
    objective = QCBObjective(spec, model, handle, trigger, int(target), int(x.shape[0]))
    return QCBTraining(x, torch.stack([y, flags], dim=1), objective, handle, marked)
