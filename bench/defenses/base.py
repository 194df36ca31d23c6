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

Threat model: ``Defense.sees`` names what the defender has (:data:`THREAT_MODEL`: ``model``, ``clean``,
``poisoned``); the context hands a defense nothing else, and reading excluded data raises
:class:`ThreatModelError` naming the defense and its ``sees``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from bench.attacks.base import Trigger
from bench.errors import BenchError, ComponentParamsError, PluginError
from bench.models.base import BenchModel

#: Default share of the clean training set a defender holds (BackdoorBench's habit for fine-tuning
#: based defenses).
DEFAULT_BUDGET = 0.05

Metric = float | int | str

#: What a defense may see (the values of :attr:`Defense.sees`), each with what it gives the defense.
THREAT_MODEL: dict[str, str] = {
    "model": "the attacked model's trained weights (without it, run() gets a fresh model of the same architecture, "
             "initialised as the attacked model was before training)",
    "clean": "a budget share of the clean training set (ctx.clean_x, ctx.clean_y)",
    "poisoned": "the attacker's poisoned training set, exactly as the attacked model was trained on it "
                "(ctx.poisoned_x, ctx.poisoned_y), as data-inspection and training-time defenses assume",
}
#: The usual post-training threat model: the attacked model and a little clean data.
DEFAULT_SEES: frozenset[str] = frozenset({"model", "clean"})


class ThreatModelError(BenchError):
    """A defense read data its threat model (``sees``) excludes, or data the context was not given."""


def check_sees(defense: str, sees: object) -> frozenset[str]:
    """``sees`` as a frozenset of :data:`THREAT_MODEL` keys; anything else is a :class:`PluginError`."""
    if isinstance(sees, str) or not isinstance(sees, set | frozenset | tuple | list):
        raise PluginError(f"defense '{defense}': sees must be a frozenset of {', '.join(THREAT_MODEL)}, got {sees!r}")
    unknown = sorted(str(v) for v in sees if v not in THREAT_MODEL)
    if unknown:
        raise PluginError(f"defense '{defense}': sees has unknown value(s) {', '.join(unknown)}; "
                          f"known: {', '.join(THREAT_MODEL)}")
    return frozenset(sees)


def sees_label(sees: frozenset[str]) -> str:
    """``model + clean``: a threat model in :data:`THREAT_MODEL`'s order, for reports."""
    return " + ".join(k for k in THREAT_MODEL if k in sees) or "nothing"


@dataclass(frozen=True)
class PoisonedData:
    """The attacker's poisoned training set. ``truth``: ``[N]`` bool, True at the truly poisoned samples
    (benchmark-only: for precision / recall metrics, never for a defense's decisions)."""

    x: torch.Tensor
    y: torch.Tensor
    truth: torch.Tensor


class _Seen:
    """A :class:`DefenseContext` field readable only by a defense whose ``sees`` holds ``need``."""

    def __init__(self, need: str) -> None:
        self.need = need

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, f"_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            raise AttributeError(self.name)  # no class-level default: the dataclass field stays required
        obj.require(self.need, self.name)
        return obj.__dict__[self.slot]

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value


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
    defense / sees: the defense's name and threat model (:attr:`Defense.sees`); data outside ``sees`` raises
        :class:`ThreatModelError` when read (``clean_x``, ``clean_y``, ``poisoned_x``, ...).
    poisoned: the poisoned training set (:class:`PoisonedData`), given only to defenses that see
        ``poisoned``; read it as ``poisoned_x``, ``poisoned_y`` and ``poisoned_truth``.
    fresh_model: a new, untrained model of the attacked model's architecture, initialised exactly as the
        attacked model was (its seed): for defenses that retrain from scratch.
    """

    clean_x: torch.Tensor = _Seen("clean")  # type: ignore[assignment]
    clean_y: torch.Tensor = _Seen("clean")  # type: ignore[assignment]
    train_cfg: dict[str, Any]
    seed: int
    num_classes: int
    augment: str = "none"
    on_epoch: Callable[[int, int, float], None] | None = None
    trigger: Trigger | None = None
    target: int | None = None
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    defense: str = "defense"
    sees: frozenset[str] = DEFAULT_SEES
    poisoned: PoisonedData | None = None
    fresh_model: Callable[[], BenchModel] | None = None

    def __post_init__(self) -> None:
        self.sees = check_sees(self.defense, self.sees)
        if self.poisoned is not None and "poisoned" not in self.sees:
            raise ThreatModelError(f"defense '{self.defense}' sees {sees_label(self.sees)}: it must not be given "
                                   "the poisoned training set")

    def __repr__(self) -> str:
        return f"DefenseContext(defense={self.defense!r}, sees={sees_label(self.sees)!r}, seed={self.seed})"

    def require(self, need: str, what: str) -> None:
        """Raise :class:`ThreatModelError` unless the defense's ``sees`` holds ``need`` (``what``: the field)."""
        if need not in self.sees:
            raise ThreatModelError(
                f"defense '{self.defense}' read ctx.{what}, but its threat model (sees = {sees_label(self.sees)}) "
                f"excludes '{need}': {THREAT_MODEL[need]}; declare it in the class's `sees` if the method assumes it"
            )

    def _poisoned(self, what: str) -> PoisonedData:
        self.require("poisoned", what)
        if self.poisoned is None:
            raise ThreatModelError(f"defense '{self.defense}' read ctx.{what}, but this context holds no poisoned "
                                   "training set")
        return self.poisoned

    @property
    def poisoned_x(self) -> torch.Tensor:
        """The poisoned training set's images (only for defenses that see ``poisoned``)."""
        return self._poisoned("poisoned_x").x

    @property
    def poisoned_y(self) -> torch.Tensor:
        """The poisoned training set's labels, as the attacked model was trained on them."""
        return self._poisoned("poisoned_y").y

    @property
    def poisoned_truth(self) -> torch.Tensor:
        """``[N]`` bool: the truly poisoned samples. Benchmark-only (detection metrics), never for decisions."""
        return self._poisoned("poisoned_truth").truth

    @property
    def device(self) -> torch.device:
        return self.__dict__["_clean_x"].device

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
    sees: the threat model, what the defender has (keys of :data:`THREAT_MODEL`). ``model``: the attacked
        model's weights; ``clean``: a ``budget`` share of the clean training set; ``poisoned``: the
        attacker's poisoned training set as the attacked model was trained on it (data-inspection and
        training-time defenses). Default ``{"model", "clean"}`` (post-training defenses). The engine gives
        a defense only what it sees; unknown values are refused when the class is defined.
    """

    stages: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[frozenset[str]] = frozenset()
    needs_routing: ClassVar[bool] = False
    sees: ClassVar[frozenset[str]] = DEFAULT_SEES
    #: Registry name, for messages.
    name: ClassVar[str] = "defense"

    budget: float

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.sees = check_sees(getattr(cls, "name", cls.__name__), cls.sees)

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
