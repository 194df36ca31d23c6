"""The ``search:`` block of a scenario: its typed schema and error messages that carry the full path.

A search tunes numbers of an otherwise ordinary, single-cell scenario (one dataset, model, train setting,
attack and poison rate; the first seed) with Optuna::

    search:
      objective: dormant          # dormant | multi | asr
      target_quant: int4/whole    # whose ASR "at target bits" means (default: the qcb objective's setting)
      tau: 0.1                    # dormant: fp32 ASR must stay <= tau
      asleep_quant: [int8/whole]  # dormant: ... and so must the ASR at these quantized evaluations
      epsilon: 0.02               # dormant, asr: BA drop vs the clean baseline must stay <= epsilon
      epsilon_at: fp32            # dormant: fp32 (the fp32 BA) | all (fp32, target and asleep_quant BAs)
      n_trials: 20                # total finished trials the study aims at (and/or timeout: seconds)
      sampler: tpe                # tpe | nsga2 | random, seeded with seed
      pruner: median              # median | none | {name: median, startup_trials: 2, warmup_epochs: 1}
      params:
        - {path: attacks.0.objective.lambda_bd, low: 0.1, high: 10, log: true}
        - {path: attacks.0.strength, low: 0.3, high: 1.0}     # the trigger's declared strength parameter

The scenario schema (:mod:`bench.scenario`) only carries the block; it is validated here.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bench.errors import ScenarioError
from bench.scenario import format_loc

ObjectiveName = Literal["dormant", "multi", "asr"]
SamplerName = Literal["tpe", "nsga2", "random"]

#: Trials the study aims at when the block gives neither ``n_trials`` nor ``timeout``.
DEFAULT_TRIALS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpec(_Strict):
    """One searched number: a dotted path into the scenario and its range (or choices).

    ``path`` indexes lists by position (``attacks.0.size``; ``attacks[0].size`` is the same). A last part
    ``strength`` under an attack entry means that trigger's declared strength parameter (badnets
    ``intensity``, blend ``alpha``, wanet ``s``).
    """

    path: str = Field(min_length=1)
    type: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check_range(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("choices: a categorical parameter needs choices: [a, b, ...]")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("type: a categorical parameter takes choices only (no low, high, log, step)")
            if any(isinstance(c, dict | list) for c in self.choices):
                raise ValueError("choices: must be plain values (numbers, strings, booleans, null)")
            return self
        if self.choices is not None:
            raise ValueError(f"choices: belong to type: categorical; a {self.type} parameter takes low, high")
        for key in ("low", "high"):
            value = getattr(self, key)
            if value is None:
                raise ValueError(f"{key}: a {self.type} parameter needs low and high")
            if not math.isfinite(value):
                raise ValueError(f"{key}: must be finite, got {value}")
        if self.low > self.high:  # type: ignore[operator]
            raise ValueError(f"low: must be <= high ({self.high}), got {self.low}")
        if self.log and self.low <= 0:  # type: ignore[operator]
            raise ValueError(f"low: must be > 0 with log: true, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("step: cannot be combined with log: true (Optuna samples on a grid or in log)")
        if self.type == "int":
            for key in ("low", "high", "step"):
                value = getattr(self, key)
                if value is not None and value != int(value):
                    raise ValueError(f"{key}: an int parameter needs an integer, got {value}")
        return self


class PrunerSpec(_Strict):
    """Optuna's median pruner: stop a trial whose intermediate value at an epoch is worse than the median
    of the complete trials' values at that epoch, once ``startup_trials`` trials are complete; no trial is
    pruned during its first ``warmup_epochs`` epochs."""

    name: Literal["median", "none"] = "median"
    startup_trials: int = Field(2, ge=0)
    warmup_epochs: int = Field(0, ge=0)


class SearchSpec(_Strict):
    """The whole ``search:`` block (see the module docstring; README documents every field)."""

    objective: ObjectiveName = "dormant"
    params: list[ParamSpec] = Field(min_length=1)
    target_quant: str | None = None  # a quantization label (int4/whole); default: the qcb objective's
    tau: float = Field(0.1, ge=0, le=1)  # dormant: highest fp32 ASR allowed
    asleep_quant: list[str] = Field(default_factory=list)  # dormant: labels whose ASR must also stay <= tau
    epsilon: float = Field(0.02, ge=0, le=1)  # dormant, asr: highest BA drop allowed
    epsilon_at: Literal["fp32", "all"] = "fp32"  # dormant: whose BA epsilon bounds (all: every evaluation)
    n_trials: int | None = Field(None, ge=1)  # finished trials the study aims at, over all sessions
    timeout: float | None = Field(None, gt=0)  # seconds after which a session starts no new trial
    sampler: SamplerName = "tpe"
    seed: int = 0
    startup_trials: int = Field(5, ge=0)  # tpe: random trials before it models the results
    population_size: int = Field(10, ge=2)  # nsga2: trials per generation
    pruner: PrunerSpec | None = None  # default: median for one objective, none for multi
    probe_size: int = Field(256, ge=0)  # test images behind each epoch's intermediate value; 0: none
    enqueue: list[dict[str, Any]] = Field(default_factory=list)  # points tried first: {path: value}

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_pruning(self) -> SearchSpec:
        if self.objective == "multi" and self.pruner is not None and self.pruner.name != "none":
            raise ValueError(
                "pruner: Optuna cannot prune a multi-objective trial (three values, no single intermediate "
                "value); use pruner: none with objective: multi"
            )
        if self.epsilon_at == "all" and self.objective != "dormant":
            why = "asr has no quantized evaluation to bound" if self.objective == "asr" else "multi has no constraints"
            raise ValueError(
                f"epsilon_at: 'all' bounds the BA at the quantized evaluations of objective: dormant only ({why}); "
                f"use epsilon_at: fp32"
            )
        return self

    @property
    def pruning(self) -> PrunerSpec:
        """The pruner in effect: the declared one, else median for one objective and none for ``multi``."""
        if self.pruner is not None:
            return self.pruner
        return PrunerSpec(name="none" if self.objective == "multi" else "median")

    @property
    def budget(self) -> int | None:
        """Finished trials the study aims at (None: until ``timeout``)."""
        if self.n_trials is None and self.timeout is None:
            return DEFAULT_TRIALS
        return self.n_trials


def parse_search(block: Any, source: str) -> SearchSpec:
    """Validate a raw ``search:`` block; errors read ``<source>: search.params[0].low: ...``."""
    if not isinstance(block, dict):
        raise ScenarioError(
            f"{source}: search: must be a mapping (objective:, params:, ...), got {type(block).__name__}"
        )
    try:
        return SearchSpec.model_validate(block)
    except ValidationError as exc:
        raise ScenarioError(f"{source}: {_message(exc)}") from None


def _message(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        owner = _container(loc)
        field, sep, rest = msg.partition(": ")
        if err["type"] == "value_error" and sep and field in owner.model_fields:
            loc, msg = (*loc, field), rest  # a cross-field rule names the field it is about
        path = "search" + ("." + format_loc(loc) if loc else "")
        if err["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown field; allowed: {', '.join(_container(loc[:-1]).model_fields)}")
        elif err["type"] == "missing":
            lines.append(f"{path}: required field is missing")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict | list) or err["type"] == "value_error" else f", got {got!r}"
            lines.append(f"{path}: {msg}{shown}")
    return "; ".join(lines)


def _container(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The schema of the object at ``loc`` (``("params", 0)`` -> :class:`ParamSpec`)."""
    if len(loc) >= 2 and loc[0] == "params":
        return ParamSpec
    if loc and loc[0] == "pruner":
        return PrunerSpec
    return SearchSpec
