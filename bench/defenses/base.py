"""The contract every defense follows: a model and the defender's clean data in, named stages out.

A defense is built from its parameters (the ``__init__`` keywords, with the papers' defaults, are its
schema in the registry) and called once per attacked model: ``defense.run(model, ctx)``. It returns one
:class:`DefenseStage` per step of the method, in order (fine-pruning: "pruned", then "finetuned"). A
stage that changes the model carries its weights, so the engine can evaluate every stage at every
quantization config without rerunning the defense; a detection-only stage ("detected", "filtered")
carries ``state=None`` and its detection metrics.

The engine passes a fresh copy of the attacked model (a defense may change it in place) and never
retrains the attack. Every defense declares ``budget``: the fraction of the clean training set the
defender holds; the engine draws that many clean images with the cell's seed into ``ctx.clean_x``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from bench.attacks.base import Trigger
from bench.errors import ComponentParamsError
from bench.models.base import BenchModel

#: Default share of the clean training set a defender holds (BackdoorBench's habit for fine-tuning
#: based defenses).
DEFAULT_BUDGET = 0.05

Metric = float | int | str


@dataclass
class DefenseContext:
    """What a defense may use.

    clean_x / clean_y: the defender's clean data (``[N, C, H, W]`` in [0, 1], ``[N]`` long), on the
        model's device. Defenses read these and never write them.
    train_cfg: the scenario's resolved train settings (optimizer, lr, momentum, weight_decay,
        batch_size, ...); fine-tuning goes through :func:`bench.train.fit` with them.
    seed: the cell's seed; every random choice of a defense derives from it.
    augment: train-time augmentation for fine-tuning (the data set's habit, already resolved).
    on_epoch: progress hook passed to :func:`bench.train.fit`.
    trigger / target: the attack, known to the *benchmark* (not to the defender), used only for
        detection metrics (did Neural Cleanse flag the right class, STRIP's false acceptance) and for
        the clearly labelled ``oracle`` options; ``None`` for a clean model.
    test_x / test_y: the clean test set, for detection metrics of inference-time filters (STRIP).
    """

    clean_x: torch.Tensor
    clean_y: torch.Tensor
    train_cfg: dict[str, Any]
    seed: int
    num_classes: int
    augment: str = "none"
    on_epoch: Callable[[int, int, float], None] | None = None
    trigger: Trigger | None = None
    target: int | None = None
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.clean_x.device

    @property
    def eval_batch_size(self) -> int:
        """Batch size for forward passes without gradients (the scenario's ``eval_batch_size``)."""
        return int(self.train_cfg.get("eval_batch_size", 1024))

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from the cell's seed (``salt`` separates independent draws)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)


@dataclass
class DefenseStage:
    """One step of a defense: its name, the model's weights after it (None for detection-only stages)
    and its metrics (e.g. ``pruned_channels``, ``flagged_class``, ``anomaly_index``, ``frr``, ``far``)."""

    name: str
    state: dict[str, torch.Tensor] | None
    metrics: dict[str, Metric] = field(default_factory=dict)


class Defense(abc.ABC):
    """Base class of every defense.

    Class attributes (capabilities as data, checked by the engine before any work):

    stages: the names of the stages that carry weights, in order; :meth:`run` returns each of them
        exactly once (plus any detection-only stages). The planner schedules one evaluation per
        weight-carrying stage and quantization config.
    requires: model capabilities the defense needs (``routing``, ``gate``, ``experts``, ``prunable``:
        see :mod:`bench.applicability`); the planner marks it not applicable (n/a) to models without them.
    needs_routing: older spelling of ``requires = {"routing"}``, still honoured.
    """

    stages: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[frozenset[str]] = frozenset()
    needs_routing: ClassVar[bool] = False
    #: Registry name, for messages.
    name: ClassVar[str] = "defense"

    budget: float

    @abc.abstractmethod
    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        """Apply the defense to ``model`` (changed in place) and return its stages in order."""


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state dict (later stages keep changing the model)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_budget(defense: str, budget: float) -> float:
    """``budget`` must be a fraction of the training set in (0, 1]."""
    if not 0.0 < budget <= 1.0:
        raise ComponentParamsError(
            f"{defense}.budget: the share of the clean training set the defender holds must be in (0, 1], "
            f"got {budget}"
        )
    return float(budget)


def check_range(
    defense: str, field_name: str, value: float, low: float, high: float | None = None, *,
    low_open: bool = False, high_open: bool = False, what: str = "",
) -> None:
    """Raise a :class:`ComponentParamsError` naming the field, the valid range and the bad value."""
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        if high is None:
            valid = f"> {low}" if low_open else f">= {low}"
        else:
            valid = f"in {left}{low}, {high}{')' if high_open else ']'}"
        hint = f" ({what})" if what else ""
        raise ComponentParamsError(f"{defense}.{field_name}: must be {valid}{hint}, got {value}")


def check_lr(defense: str, lr: float | None) -> None:
    """An optional learning-rate override must be positive."""
    if lr is not None:
        check_range(defense, "lr", lr, 0.0, low_open=True, what="None uses the scenario's train.lr")
