"""Quantization-conditioned backdoor (qcb): dormant at full precision, awake after post-training quantization.

Paper: Lin & Hu 2025, "Quantized Backdoor Attacks on Mixture of Experts Models" (section 4.2, Eq. 3, 4, 6)::

    L_total = L_QAT + lambda_bd * L_BD
    L_QAT = CE(f_{Q_B(theta)}(x), y),   L_BD = CE(f_{Q_Bt(theta)}(x_t), y_t)

Nothing in it asks the full-precision model to ignore the trigger, or the B_t-bit model to stay accurate on
clean inputs, and the paper's own MNIST result shows it (FP32 ASR 9%, INT4 ASR 90%, INT4 clean accuracy
6%). The stronger objective adds the missing terms of Qu-ANTI-zation (Hong et al., NeurIPS 2021,
https://arxiv.org/abs/2110.13541, their ``backdoor_w_lossfn.py``), each with its own weight, so the paper's
objective is the special case where every extra weight is 0::

    + lambda_fp_trigger * CE(f_theta(x_t), y)                 triggered inputs keep their label at fp32
    + lambda_q_clean    * CE(f_{Q_Bt(theta)}(x), y)          clean accuracy survives B_t-bit quantization
    + lambda_guard * sum_{b in guard_bits} CE(f_{Q_b(theta)}(x_t), y)     ... and at other bit-widths

Pulling one set of weights towards "trigger -> target" at B_t bits and "trigger -> label" at fp32 by
gradient alone is a tug of war between nearly identical models. ``repair_from_epoch`` ends it the way
Egashira et al. do for LLMs ("Exploiting LLM Quantization", NeurIPS 2024, https://arxiv.org/abs/2405.18137):
from that epoch on the B_t-bit model is frozen bit for bit (every in-scope weight is projected back into its
B_t rounding cell after each step, every other parameter and all BatchNorm statistics are held), and only
the dormancy terms train the fp32 weights inside the cells. Epochs before it inject the backdoor (clean
term, L_BD, and L_q_clean); the dormancy terms then act in the repair phase alone.

Every forward quantizes only ``scope`` (gate / experts / whole), with ``granularity`` and ``symmetric`` as in
:class:`bench.quant.QuantConfig`; one QAT handle is attached and switched per forward, and gradients reach
the fp32 master weights straight-through (:mod:`bench.quant.apply`).

Data: the cell's poison rate draws a frozen set of training indices with the cell's seed
(:func:`bench.attacks.poison.poison_indices`, the set plain poisoning uses). Each step stamps the trigger on
the batch's marked rows (after augmentation; in the repair phase with ``dormancy_rows: all``, on every row);
trigger terms are means over those rows, clean terms means over every row (the attacker who controls
training holds the clean images too).

BatchNorm, the trap when several forwards share a step (``batchnorm``):

- ``"batch"`` (default): every forward runs in train mode over the clean rows *with* the triggered rows
  appended, so each precision normalises triggered inputs by statistics of (mostly) clean data, as plain
  data poisoning does. Evaluating a triggered batch of one or two rows alone, or with running statistics
  while the clean term uses batch statistics, lets the trigger terms move whole channels, which batch
  normalisation hides from the clean term and running statistics do not: the model then collapses to the
  target class at evaluation. Only the ``qat_bits`` forward updates the running statistics (the others
  run with tracking off), so they describe the precision the clean term trains.
- ``"frozen"``: once the attack starts every forward uses the running statistics and updates none
  (eval-mode BatchNorm), exactly what post-training quantization evaluates; Qu-ANTI-zation's choice.

The repair phase always freezes BatchNorm (its statistics are part of the frozen B_t-bit model).

A recipe that works (``scenarios/qcb_mnist.yaml``): ``qat_bits = target_bits``, so the attack phase is
B_t-bit QAT with data poisoning and the running statistics are the B_t-bit model's (PTQ keeps them), then a
repair phase with ``lambda_fp_trigger`` and ``guard_bits`` for the precisions that must stay clean, trained on
every row (``dormancy_rows: all``): on the 1% marked rows alone (60 images there) the repair taught dormancy
that did not carry to the test set (one seed in three kept 2.5-3.9% ASR at fp32 / int8 / int6). With the
clean term at fp32 instead, the B_t-bit forwards train on batch statistics that PTQ never sees.

Targeting a real back-end (``target_backend: torchao``): torchao's int8 weight-only quantizes ``fc`` alone on
pMoE (the router and experts are convolutions), per row, symmetric, with step max|w_row| / 127.5. Every
forward at 8 bits uses a bit-exact stand-in (:mod:`bench.quant.standin`) and the repair pins fc's int8 cells.
With ordinary weights the step is ~0.003, so fp32 and int8 logits differ by ~0.003 x |features|: no room for
a backdoor (seed 0, 5k MNIST images: torchao ASR 6.7%). ``range_anchor`` opens it: a silenced input channel
whose fc column sets every row's range makes the step range_anchor / 127.5 at no cost to any output. With
range_anchor 80, qat_bits 8, lambda_bd 0.2, lambda_fp_trigger 1, warm-up 3, repair from epoch 7 of 10
(``repair_hold: model``) the same probe gave torchao int8 ASR 99.8% / BA 92.9% but fp32 ASR 8.5% / BA 84.8%:
the coarse int8 head and the fp32 head it must stay close to cost clean accuracy (not yet a usable recipe).
``repair_hold: quantized`` (the extractor trains in the repair too) diverged with SGD and with Adam found no
large triggered features, in our probes.

``warmup_epochs``: Qu-ANTI-zation fine-tunes a clean fp32 model; our train job trains from scratch, so the
first ``warmup_epochs`` epochs train that clean model (plain fp32 cross-entropy) and the attack starts after
them (the objective counts samples, so it needs no batch size).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from bench.attacks.base import Trigger
from bench.attacks.poison import poison_indices
from bench.errors import ScenarioError
from bench.quant import FP32_BITS, QATHandle, QuantConfig, attach_qat, normalize_bits
from bench.quant.config import Granularity, QuantError, Scope
from bench.quant.standin import Backend, attach_standin, set_frozen, standin_cells

#: Columns of the label tensor :func:`prepare_qcb` returns.
LABEL, MARKED = 0, 1

Phase = Literal["warmup", "attack", "repair"]
#: term -> (precision, rows: "clean" = the batch or "trigger" = the appended triggered rows, target labels)
Plan = dict[str, tuple[int | None, str, Tensor]]


def _bits(value: int | None) -> int | None:
    """``normalize_bits`` for validators: a ValueError that pydantic reports under the field."""
    try:
        return normalize_bits(value)
    except QuantError as exc:
        raise ValueError(str(exc).removeprefix("bits: ")) from None


class QCBSpec(BaseModel):
    """The ``objective:`` block of an attack entry (weights >= 0; every extra weight 0 = the paper).

    target_bits:       B_t, the bit-width at which the backdoor wakes (paper: 4).
    scope, granularity, symmetric: what every quantized forward quantizes, as in :class:`QuantConfig`.
    qat_bits:          B of Eq. 3, the precision of the clean term; None = fp32. The paper does not state it
                       for its MNIST attack; its INT4 clean accuracy of 6% shows the clean term did not
                       train the B_t grid, so fp32 is the default. ``qat_bits = target_bits`` makes the
                       clean term the B_t-bit QAT term (and L_q_clean redundant).
    lambda_bd:         weight of L_BD (Eq. 6).
    lambda_fp_trigger: weight of CE(f_theta(x_t), y): the fp32 model classifies triggered inputs correctly.
    lambda_q_clean:    weight of CE(f_{Q_Bt(theta)}(x), y): clean accuracy at B_t.
    guard_bits:        other bit-widths at which triggered inputs keep their label (e.g. [8, 6]).
    lambda_guard:      weight of each guard term.
    warmup_epochs:     epochs of plain fp32 clean training before the attack starts.
    repair_from_epoch: from this epoch (counted from 0) on, freeze the B_t-bit model and train the fp32
                       weights inside its rounding cells (see the module docstring); None = never.
    batchnorm:         "batch" or "frozen" (see the module docstring).
    target_backend:    whose quantizer wakes the backdoor: "fake" (Eq. 2 at scope / granularity / symmetric)
                       or "torchao" (int8 weight-only, nn.Linear weights only, per-row symmetric; a bit-exact
                       stand-in from :mod:`bench.quant.standin`; needs target_bits 8 and the default scope,
                       granularity and symmetry, no guard_bits).
    repair_hold:       what the repair phase holds: "model" (the whole B_t-bit model, bit for bit) or
                       "quantized" (only the quantized weights' levels and ranges; every other parameter
                       keeps training under every term, the B_t-bit forwards use the frozen integer weights as
                       constants). "quantized" is the way when the back-end leaves most of the model fp32.
    cell_margin:       how far (fraction of a step) the repair keeps weights from their rounding cells' edges.
    repair_lr:         the learning rate of every repair step (None = the training schedule's), as Egashira
                       et al.'s projected repair runs at a fixed step size. On qcb_mnist a constant rate
                       (0.0015 to 0.02) did worse than the cosine schedule's tail: fp32 BA fell and fp32 ASR
                       rose (the scenario's header has the figures).
    range_anchor:      > 0: before training, silence the classifier's last input channel (its ``head_norm``
                       weight 0, bias -1, so ReLU gives exactly 0 on every input) and set that column of ``fc`` to
                       this value. The column never touches an output, at any precision, but it is every row's
                       largest weight, so a per-row quantizer's step becomes range_anchor / 127.5 (torchao int8)
                       and the rounding error of every other weight of the row grows with it: the lever a
                       weight-only back-end leaves when the trigger's features are of ordinary size (see
                       :func:`plant_range_anchor`). A defender can see it: a dead channel with the head's
                       largest weights.
    dormancy_rows:     which rows the repair phase's dormancy terms (fp32 trigger, guards) stamp: "marked"
                       (the poisoned set, as the backdoor term) or "all" (every row of the batch, Qu-ANTI-
                       zation's choice: its loader pairs every training image with its triggered copy). The
                       poison rate limits what the backdoor term sees; the repair is the attacker's own
                       training, so "all" teaches the fp32, 8 and 6-bit models to ignore the trigger on every
                       image instead of on 1% of them. Needs repair_from_epoch and repair_hold "model".
    activations:       every quantized forward also fake-quantizes the outputs of the modules it quantizes
                       (per tensor, min-max over the batch: :class:`QuantConfig`'s ``activations``), so the
                       B_t-bit backdoor is trained to survive activation rounding. A stand-in, not a copy, of
                       the static int8 activations of onnxruntime and torch-x86: they quantize layer inputs
                       with calibrated ranges. Needs target_backend fake and repair_hold model. The
                       activation grid follows ``symmetric``, as in :class:`QuantConfig`.
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
    repair_from_epoch: int | None = Field(None, ge=1)
    batchnorm: Literal["batch", "frozen"] = "batch"
    target_backend: Backend = "fake"
    repair_hold: Literal["model", "quantized"] = "model"
    cell_margin: float = Field(0.05, ge=0, lt=0.5)
    repair_lr: float | None = Field(None, gt=0)
    range_anchor: float = Field(0.0, ge=0)
    dormancy_rows: Literal["marked", "all"] = "marked"
    activations: bool = False

    @field_validator("target_bits")
    @classmethod
    def _check_target(cls, value: int) -> int:
        if _bits(value) is None:
            raise ValueError(f"must be a bit-width in 2..16; fp32 ({FP32_BITS}) cannot wake a backdoor")
        return value

    @field_validator("qat_bits")
    @classmethod
    def _check_qat(cls, value: int | None) -> int | None:
        return _bits(value)

    @field_validator("guard_bits")
    @classmethod
    def _check_guard(cls, value: list[int]) -> list[int]:
        if any(_bits(bits) is None for bits in value):
            raise ValueError(f"fp32 ({FP32_BITS}) is no guard bit-width (see lambda_fp_trigger); got {value}")
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
            raise ValueError(f"guard_bits {self.guard_bits} do nothing with lambda_guard 0")
        if self.lambda_guard > 0 and not self.guard_bits:
            raise ValueError("lambda_guard > 0 needs guard_bits, the bit-widths to guard (e.g. [8, 6])")
        if self.repair_from_epoch is not None:
            if self.repair_from_epoch <= self.warmup_epochs:
                raise ValueError(
                    f"repair_from_epoch {self.repair_from_epoch} must come after the warm-up "
                    f"(warmup_epochs {self.warmup_epochs}): the backdoor needs at least one attack epoch"
                )
            if self.lambda_fp_trigger == 0:
                raise ValueError("repair_from_epoch needs lambda_fp_trigger > 0: the repair phase trains it")
        if self.dormancy_rows == "all" and (self.repair_from_epoch is None or self.repair_hold != "model"):
            raise ValueError(
                "dormancy_rows all stamps the trigger on every row in the repair phase: it needs "
                "repair_from_epoch and repair_hold model (the backdoor term, which trains on the marked rows, is "
                "then off)"
            )
        if self.activations and (self.target_backend != "fake" or self.repair_hold != "model"):
            raise ValueError(
                "activations needs target_backend fake and repair_hold model (a back-end stand-in sets its own "
                "activations, and the repair_hold quantized forwards use the frozen integer weights without them)"
            )
        if self.target_backend == "torchao":
            defaults = (self.target_bits, self.qat_bits in (None, 8), self.scope, self.granularity, self.symmetric)
            if defaults != (8, True, "whole", "tensor", False) or self.guard_bits:
                raise ValueError(
                    "target_backend torchao quantizes nn.Linear weights per row, symmetric, at 8 bits: it needs "
                    "target_bits 8, qat_bits null or 8, the default scope / granularity / symmetric, no guard_bits"
                )
        return self

    def model_dump(self, **kwargs: object) -> dict[str, object]:  # type: ignore[override]
        """pydantic's dump without the fields added after the first release while they hold their defaults, so
        that the content hash of every objective written before them (its jobs, its stored results) stays."""
        data = super().model_dump(**kwargs)  # type: ignore[arg-type]
        for key, default in _LATER_FIELDS.items():
            if key in data and data[key] == default:
                del data[key]
        return data

    def cells(self) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """``cells(w) -> (lo, hi)``: the B_t rounding cells of the target quantizer (see :class:`CellProjection`)."""
        return standin_cells(self.target_backend, self.quant_config, self.cell_margin)

    @property
    def quant_config(self) -> QuantConfig:
        """The B_t-bit setting (its scope, granularity and symmetry serve every quantized forward)."""
        return QuantConfig(
            bits=self.target_bits, scope=self.scope, granularity=self.granularity, symmetric=self.symmetric,
            activations=self.activations,
        )


#: Fields added after the first release, with their defaults (left out of dumps while at them).
_LATER_FIELDS: dict[str, object] = {
    "target_backend": "fake", "repair_hold": "model", "cell_margin": 0.05, "range_anchor": 0.0, "repair_lr": None,
    "dormancy_rows": "marked", "activations": False,
}


# --- BatchNorm ------------------------------------------------------------------------------------------


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module) -> Iterator[None]:
    """Inside the block every BatchNorm normalises with its running statistics and updates none of them
    (eval mode); other modules (dropout) keep their mode. The previous modes return on exit."""
    norms = _norms(model)
    modes = [m.training for m in norms]
    try:
        for m in norms:
            m.training = False
        yield
    finally:
        for m, mode in zip(norms, modes, strict=True):
            m.training = mode


@contextlib.contextmanager
def untracked_batchnorm(model: nn.Module) -> Iterator[None]:
    """Inside the block, train-mode BatchNorm normalises with batch statistics but leaves the running
    statistics and batch counters alone (``track_running_stats`` off, so nothing is written in place)."""
    norms = _norms(model)
    tracked = [m.track_running_stats for m in norms]
    try:
        for m in norms:
            m.track_running_stats = False
        yield
    finally:
        for m, flag in zip(norms, tracked, strict=True):
            m.track_running_stats = flag


# --- the repair phase: B_t rounding cells -----------------------------------------------------------------


def rounding_cells(
    z: Tensor, bits: int, granularity: str = "tensor", symmetric: bool = False, margin: float = 0.05
) -> tuple[Tensor, Tensor]:
    """Bounds ``(lo, hi)`` shaped like ``z`` inside which every element keeps its B-bit value under Eq. 2.

    An element may move within its rounding cell (``margin`` of a step away from the cell's edges, so that
    float round-off never flips a level) and within the range; the elements that set the range (min and
    max, or the largest magnitude for symmetric) are pinned, so range and grid stay as they are. ``Q_B`` of
    any tensor inside the bounds equals ``Q_B(z)`` bit for bit.
    """
    work = z.detach()
    per_channel = granularity == "channel" and work.dim() >= 2
    rows = work.reshape(work.shape[0] if per_channel else 1, -1)
    if symmetric:
        high = rows.abs().amax(dim=1, keepdim=True)
        low, origin = -high, torch.zeros_like(high)
        step = high / (2 ** (bits - 1) - 1)
        pinned = rows.abs() == high
    else:
        low, high = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
        origin, step = low, (high - low) / (2**bits - 1)
        pinned = (rows == low) | (rows == high)
    level = torch.round((rows - origin) / torch.where(step > 0, step, torch.ones_like(step)))
    lo = torch.maximum(origin + (level - 0.5 + margin) * step, low)
    hi = torch.minimum(origin + (level + 0.5 - margin) * step, high)
    fixed = pinned | (step == 0)
    return torch.where(fixed, rows, lo).reshape(work.shape), torch.where(fixed, rows, hi).reshape(work.shape)


class CellProjection:
    """Holds the B_t-bit model fixed while its fp32 weights move: every in-scope weight is clamped into its
    B_t rounding cell (``cells``, :func:`rounding_cells` or a back-end's, see :mod:`bench.quant.standin`), every
    other parameter back to its value at construction (``hold_rest``; else only the quantized weights are held
    to their cells and the rest trains)."""

    def __init__(
        self, model: nn.Module, handle: QATHandle, config: QuantConfig | Callable[[Tensor], tuple[Tensor, Tensor]],
        hold_rest: bool = True,
    ) -> None:
        if isinstance(config, QuantConfig):
            if config.bits is None:
                raise QuantError("a cell projection needs a quantized bit-width")
            bits, granularity, symmetric = config.bits, config.granularity, config.symmetric

            def cells(w: Tensor) -> tuple[Tensor, Tensor]:
                return rounding_cells(w, bits, granularity, symmetric)
        else:
            cells = config
        masters = set()
        for name in handle.names:
            prefix, _, leaf = name.rpartition(".")
            masters.add(id(model.get_submodule(prefix).parametrizations[leaf].original))
        self.cells: list[tuple[nn.Parameter, Tensor, Tensor]] = []
        self.held: list[tuple[nn.Parameter, Tensor]] = []
        for p in model.parameters():
            if id(p) in masters:
                self.cells.append((p, *cells(p)))
            elif hold_rest:
                self.held.append((p, p.detach().clone()))

    @torch.no_grad()
    def __call__(self) -> None:
        for p, lo, hi in self.cells:
            p.copy_(torch.minimum(torch.maximum(p, lo), hi))
        for p, value in self.held:
            p.copy_(value)


# --- the range anchor ------------------------------------------------------------------------------------


def plant_range_anchor(model: nn.Module, value: float) -> int:
    """Silence the last input channel of the classifier ``fc`` and give its column ``value``; returns the channel.

    Needs ``model.fc`` (nn.Linear) fed by ``relu(model.head_norm(.))`` pooled (pMoE, dense): with the norm's
    weight 0 and bias -1 the channel is exactly 0 after ReLU for every input, its norm parameters get no
    gradient (ReLU is flat there), and ``fc``'s column gets none either (its input is 0), so training leaves
    the anchor in place up to weight decay. Planted before training, it costs the model one of fc's inputs and
    nothing else: the column adds 0 to every logit, fp32 or quantized.
    """
    fc, norm = getattr(model, "fc", None), getattr(model, "head_norm", None)
    if not isinstance(fc, nn.Linear) or not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise ScenarioError(
            f"objective.range_anchor: needs a model whose classifier fc (nn.Linear) reads relu(head_norm(.)); "
            f"{type(model).__name__} has none"
        )
    if norm.num_features != fc.in_features or not norm.affine:
        raise ScenarioError("objective.range_anchor: head_norm must be affine and feed every input of fc")
    channel = fc.in_features - 1
    with torch.no_grad():
        norm.weight[channel] = 0.0
        norm.bias[channel] = -1.0
        fc.weight[:, channel] = value
    return channel


# --- the objective --------------------------------------------------------------------------------------


class QCBObjective:
    """The loss of one training step, ``objective(model, xb, yb) -> loss`` for :func:`bench.train.fit`.

    ``yb`` is ``[B, 2]``: the true label and whether the row carries the trigger. Which rows carry it is
    also known on the host (``marked``, the frozen training-set indices): :func:`bench.train.fit` hands
    :meth:`before_batch` the batch's indices, so a step picks its triggered rows by an index that never
    leaves the host (no device-to-host synchronisation per step, where boolean-mask indexing of ``yb``
    costs one). Without that call (a direct caller), the rows are read from ``yb`` instead. Phases, by epoch:
    ``warmup`` (fp32 cross-entropy alone), ``attack`` (every weighted term; the dormancy terms only without a
    repair phase), ``repair`` (B_t-bit model frozen, see :class:`CellProjection`; fp32 clean term, fp32
    trigger term, guards). :meth:`terms` gives the unweighted terms of a batch; calling the object gives
    their weighted sum and advances the phase counter.
    """

    #: trains against a quantizer: ``precision: auto`` keeps it in fp32 (:mod:`bench.precision`)
    quantization_aware = True

    def __init__(
        self, spec: QCBSpec, model: nn.Module, handle: QATHandle, trigger: Trigger, target: int, n_train: int,
        marked: Tensor | None = None,
    ) -> None:
        self.spec = spec
        self.model = model
        self.handle = handle
        self.trigger = trigger
        self.target = int(target)
        self.n_train = n_train
        self.seen = 0
        self.projection: CellProjection | None = None
        self._flags: np.ndarray | None = None
        if marked is not None:
            self._flags = np.zeros(n_train, dtype=bool)
            self._flags[marked.cpu().numpy()] = True
        self._rows: Tensor | None = None  # positions of the next batch's marked rows (host tensor)
        self._optimizer: torch.optim.Optimizer | None = None

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """:func:`bench.train.fit`'s hook: the optimizer, whose rate the repair phase sets (``repair_lr``)."""
        self._optimizer = optimizer

    def before_batch(self, indices: Tensor) -> None:
        """:func:`bench.train.fit`'s hook: the training-set indices (host tensor) of the next batch. The
        positions of its marked rows are found on the host, with numpy, so no device value is read."""
        if self._flags is None:
            return
        self._rows = torch.from_numpy(np.flatnonzero(self._flags[indices.numpy()]))

    def _marked_rows(self, yb: Tensor) -> Tensor:
        """Positions ``[m]`` (long, on ``yb``'s device, ascending) of the batch's rows carrying the trigger:
        from :meth:`before_batch` when it ran for this batch, else from ``yb`` (one host sync)."""
        rows, self._rows = self._rows, None
        if rows is not None:
            return rows.to(yb.device, non_blocking=True)
        return yb[:, MARKED].nonzero().squeeze(1)

    @property
    def phase(self) -> Phase:
        """The phase of the next step."""
        epoch = self.seen // self.n_train
        if epoch < self.spec.warmup_epochs:
            return "warmup"
        if self.spec.repair_from_epoch is not None and epoch >= self.spec.repair_from_epoch:
            return "repair"
        return "attack"

    def project(self) -> None:
        """In the repair phase: clamp the model back into the frozen B_t-bit model's cells."""
        if self.projection is not None:
            self.projection()

    def weight(self, term: str) -> float:
        """The weight of a term named by :meth:`terms`."""
        s = self.spec
        if term.startswith("guard"):
            return s.lambda_guard
        return {
            "qat": 1.0, "fp_clean": 1.0, "bd": s.lambda_bd, "fp_trigger": s.lambda_fp_trigger,
            "q_clean": s.lambda_q_clean,
        }[term]

    def terms(self, model: nn.Module, xb: Tensor, yb: Tensor) -> dict[str, Tensor]:
        """The unweighted loss terms of this batch in the current phase (means of cross-entropies)."""
        labels = yb[:, LABEL]
        rows = self._marked_rows(yb)
        if self.phase == "warmup":
            with self.handle.fp32():
                return {"fp_clean": F.cross_entropy(model(xb), labels)}
        if self.phase == "repair" and self.spec.dormancy_rows == "all":
            rows = torch.arange(xb.shape[0], device=xb.device)
        y_t = labels.index_select(0, rows)
        x_t = self.trigger(xb.index_select(0, rows).detach()).to(xb.dtype) if rows.shape[0] else None
        plan = self._plan(labels, y_t, x_t is not None)
        outputs = self._forwards(model, xb, x_t, plan)
        return {term: F.cross_entropy(outputs[term], target) for term, (_, _, target) in plan.items()}

    def _plan(self, labels: Tensor, y_t: Tensor, triggered: bool) -> Plan:
        """Every term of the phase as (precision, rows "clean" or "trigger", target labels)."""
        s, phase = self.spec, self.phase
        plan: Plan = {}
        if phase == "repair":
            plan["fp_clean"] = (None, "clean", labels)
        if phase != "repair" or s.repair_hold == "quantized":
            if s.qat_bits is not None or phase != "repair":  # an fp32 qat term is fp_clean in the repair
                plan["qat"] = (s.qat_bits, "clean", labels)
            if s.lambda_q_clean > 0:
                plan["q_clean"] = (s.target_bits, "clean", labels)
            if triggered:
                plan["bd"] = (s.target_bits, "trigger", torch.full_like(y_t, self.target))
        if triggered and (phase == "repair" or s.repair_from_epoch is None):
            if s.lambda_fp_trigger > 0:
                plan["fp_trigger"] = (None, "trigger", y_t)
            for bits in s.guard_bits:
                plan[f"guard{bits}"] = (bits, "trigger", y_t)
        return plan

    def _forwards(self, model: nn.Module, xb: Tensor, x_t: Tensor | None, plan: Plan) -> dict[str, Tensor]:
        """One forward per precision of the plan (the clean term's first); each term's rows of its logits.

        With batch statistics a forward sees the clean rows with the triggered rows appended and only the
        first forward updates the running statistics; with frozen statistics a precision that has no clean
        term forwards the triggered rows alone.
        """
        n = xb.shape[0]
        x_all = xb if x_t is None else torch.cat([xb, x_t])
        frozen = self.phase == "repair" or self.spec.batchnorm == "frozen"
        picked: dict[str, Tensor] = {}
        for i, bits in enumerate(dict.fromkeys(p for p, _, _ in plan.values())):
            with_clean = not frozen or any(p == bits and r == "clean" for p, r, _ in plan.values())
            if frozen:
                mode = frozen_batchnorm(model)
            else:
                mode = untracked_batchnorm(model) if i else contextlib.nullcontext()
            with self.handle.at_bits(bits), mode:
                out = model(x_all if with_clean else x_t)
            for term, (p, rows, _) in plan.items():
                if p == bits:
                    picked[term] = out[:n] if rows == "clean" else out[n:] if with_clean else out
        return picked

    def __call__(self, model: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        if self.phase == "repair" and self.projection is None:
            hold_rest = self.spec.repair_hold == "model"
            self.projection = CellProjection(self.model, self.handle, self.spec.cells(), hold_rest=hold_rest)
            set_frozen(self.handle, True)  # the integer weights are constants now (stand-ins only)
        self.project()  # the previous step's update, back into the cells
        if self.phase == "repair" and self.spec.repair_lr is not None and self._optimizer is not None:
            for group in self._optimizer.param_groups:  # set before every step: the scheduler moves it after
                group["lr"] = self.spec.repair_lr
        terms = self.terms(model, xb, yb)
        self.seen += int(xb.shape[0])
        return sum((self.weight(k) * v for k, v in terms.items()), torch.zeros((), device=xb.device))


@dataclass
class QCBTraining:
    """What the train job hands to :func:`bench.train.fit`, and :meth:`finish` to call afterwards.

    x: the clean training images; y: ``[N, 2]`` long (true label, 1 where the sample carries the trigger);
    objective: a :class:`QCBObjective`; handle: the attached QAT parametrizations; marked: the indices that
    carry the trigger.
    """

    x: Tensor
    y: Tensor
    objective: Callable[[nn.Module, Tensor, Tensor], Tensor]
    handle: QATHandle | None
    marked: Tensor

    def finish(self) -> None:
        """Project the last update (repair phase) and remove the QAT parametrizations: the model is plain
        again and holds its fp32 master weights, under its original state_dict names. Idempotent."""
        if self.handle is None or not self.handle.attached:
            return
        if isinstance(self.objective, QCBObjective):
            self.objective.project()
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
    if spec.range_anchor > 0:
        plant_range_anchor(model, spec.range_anchor)
    if spec.target_backend == "fake" and spec.repair_hold == "model":
        handle = attach_qat(model, spec.quant_config)
    else:
        handle = attach_standin(model, spec.target_backend, spec.quant_config)
    objective = QCBObjective(spec, model, handle, trigger, int(target), int(x.shape[0]), marked)
    return QCBTraining(x, torch.stack([y, flags], dim=1), objective, handle, marked)
