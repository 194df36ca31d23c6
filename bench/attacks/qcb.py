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


class QCBObjective:
    """The loss of one training step, ``objective(model, xb, yb) -> loss`` for :func:`bench.train.fit`.

    ``yb`` is ``[B, 2]``: the true label and whether the row carries the trigger. :meth:`terms` returns the
    unweighted terms (for tests and logging); calling the object returns their weighted sum.
    """

    def __init__(
        self, spec: QCBSpec, handle: QATHandle, trigger: Trigger, target: int, warmup_samples: int
    ) -> None:
        self.spec = spec
        self.handle = handle
        self.trigger = trigger
        self.target = int(target)
        self.warmup_samples = warmup_samples
        self.seen = 0

    @property
    def attacking(self) -> bool:
        """Whether the backdoor terms are on (the warm-up is over)."""
        return self.seen >= self.warmup_samples

    def terms(self, model: nn.Module, xb: Tensor, yb: Tensor) -> dict[str, Tensor]:
        """The unweighted loss terms of this batch (``qat`` always; the others while attacking)."""
        s, h = self.spec, self.handle
        labels, marked = yb[:, LABEL], yb[:, MARKED].bool()
        frozen = self.attacking and s.batchnorm == "frozen"
        with h.at_bits(s.qat_bits), frozen_batchnorm(model) if frozen else contextlib.nullcontext():
            out = {"qat": F.cross_entropy(model(xb), labels)}
        if not self.attacking:
            return out
        x_t, y_t = xb[marked], labels[marked]
        with frozen_batchnorm(model):
            if s.lambda_q_clean > 0:
                with h.at_bits(s.target_bits):
                    out["q_clean"] = F.cross_entropy(model(xb), labels)
            if x_t.shape[0] == 0:
                return out
            with torch.no_grad():
                x_t = self.trigger(x_t).to(xb.dtype)
            with h.at_bits(s.target_bits):
                out["bd"] = F.cross_entropy(model(x_t), torch.full_like(y_t, self.target))
            if s.lambda_fp_trigger > 0:
                with h.fp32():
                    out["fp_trigger"] = F.cross_entropy(model(x_t), y_t)
            for bits in s.guard_bits:
                with h.at_bits(bits):
                    out[f"guard{bits}"] = F.cross_entropy(model(x_t), y_t)
        return out

    def weight(self, term: str) -> float:
        """The weight of a term returned by :meth:`terms`."""
        s = self.spec
        if term.startswith("guard"):
            return s.lambda_guard
        return {"qat": 1.0, "bd": s.lambda_bd, "fp_trigger": s.lambda_fp_trigger, "q_clean": s.lambda_q_clean}[term]

    def __call__(self, model: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
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
        """Remove the QAT parametrizations: the model is plain again and holds its fp32 master weights."""
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
    objective = QCBObjective(spec, handle, trigger, int(target), spec.warmup_epochs * int(x.shape[0]))
    return QCBTraining(x, torch.stack([y, flags], dim=1), objective, handle, marked)
