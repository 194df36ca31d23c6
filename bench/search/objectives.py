"""What a trial optimises, from the metrics the run store holds. Pure functions, no Optuna, no I/O.

* ``dormant``: maximise ASR at the target quantization (``target_quant``, B_t) subject to two declared
  constraints: fp32 ASR <= tau (the backdoor sleeps at full precision) and BA drop <= epsilon (the fp32
  model looks clean); with ``asleep_quant``, also ASR <= tau at each of those quantized evaluations (the
  backdoor sleeps at 8 and 6 bits too and wakes only at B_t); with ``epsilon_at: all``, the BA drop is
  the worst over fp32, B_t and every ``asleep_quant`` evaluation (the model looks clean at every bit-width,
  the quantization issue's bar), not the fp32 one alone. Constraints go to Optuna as constraint
  values (<= 0 is feasible; ``Trial.set_constraint``), which TPE and NSGA-II use when sampling and
  ``Study.best_trial`` honours; the value itself is not penalised.
* ``multi``: three objectives, ASR at B_t (up), fp32 ASR (down), BA drop (down); the Pareto front is the
  answer.
* ``asr``: ordinary attacks: maximise fp32 ASR subject to BA drop <= epsilon.

BA drop is the attacked model's fp32 BA subtracted from the fp32 BA of the clean baseline that the planner
adds to every cell (same dataset, model, seed and training), i.e. CAD.

Intermediate values (reported per training epoch, used by the pruner; single-objective only) are measured
on a fixed probe subset of the test set: ``dormant``: ASR at B_t minus the fp32 ASR in excess of tau;
``asr``: fp32 ASR. The BA drop is not in them: the clean baseline is evaluated after training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DIRECTIONS: dict[str, tuple[str, ...]] = {
    "dormant": ("maximize",),
    "multi": ("maximize", "minimize", "minimize"),
    "asr": ("maximize",),
}


@dataclass(frozen=True)
class TrialMetrics:
    """The stored metrics one trial's objective reads (fractions in [0, 1])."""

    ba: float
    asr: float
    ba_clean: float
    asr_q: float | None = None
    ba_q: float | None = None
    asr_asleep: float | None = None  # the highest ASR over search.asleep_quant (None: none declared)
    ba_asleep: float | None = None  # the lowest BA over search.asleep_quant (None: none declared)

    @property
    def ba_drop(self) -> float:
        """CAD: the clean baseline's fp32 BA minus the attacked model's."""
        return self.ba_clean - self.ba

    @property
    def worst_ba_drop(self) -> float:
        """The clean baseline's fp32 BA minus the lowest BA of the attacked model at fp32, the target and
        every ``asleep_quant`` evaluation."""
        return self.ba_clean - min(b for b in (self.ba, self.ba_q, self.ba_asleep) if b is not None)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ba_drop": self.ba_drop, "worst_ba_drop": self.worst_ba_drop}


def value_names(objective: str, target: str | None) -> list[str]:
    """Column names of the trial values, in order."""
    at = f"ASR@{target}"
    return {"dormant": [at], "multi": [at, "ASR fp32", "BA drop"], "asr": ["ASR fp32"]}[objective]


def objective_values(objective: str, m: TrialMetrics) -> list[float]:
    """The values Optuna optimises, in the order of :data:`DIRECTIONS`."""
    if objective == "asr":
        return [m.asr]
    if m.asr_q is None:
        raise ValueError(f"objective '{objective}' needs the ASR at the target quantization")
    if objective == "dormant":
        return [m.asr_q]
    return [m.asr_q, m.asr, m.ba_drop]


def constraints(
    objective: str, m: TrialMetrics, tau: float, epsilon: float, epsilon_at: str = "fp32"
) -> dict[str, float]:
    """Constraint values by name (<= 0 is feasible); ``multi`` declares none. ``epsilon_at`` (dormant):
    ``fp32`` bounds the fp32 BA drop, ``all`` the worst one (:attr:`TrialMetrics.worst_ba_drop`)."""
    if objective == "dormant":
        drop = m.worst_ba_drop if epsilon_at == "all" else m.ba_drop
        declared = {"fp32_asr_over_tau": m.asr - tau, "ba_drop_over_epsilon": drop - epsilon}
        if m.asr_asleep is not None:
            declared["asleep_asr_over_tau"] = m.asr_asleep - tau
    elif objective == "asr":
        declared = {"ba_drop_over_epsilon": m.ba_drop - epsilon}
    else:
        return {}
    # rates are stored as float32 shares of at most ~1e6 test images: a margin under 1e-6 is rounding, so a
    # value exactly at its bound (a drop of exactly 1 point) is feasible whichever way float32 rounded it
    return {name: round(value, 6) for name, value in declared.items()}


def probe_value(objective: str, asr_fp32: float, asr_q: float | None, tau: float) -> float:
    """The intermediate value of one epoch (see the module docstring)."""
    if objective == "asr":
        return asr_fp32
    if objective == "dormant" and asr_q is not None:
        return asr_q - max(0.0, asr_fp32 - tau)
    raise ValueError(f"objective '{objective}' reports no intermediate values")


def dormancy_score(m: TrialMetrics) -> float:
    """How the best of a Pareto front is picked for ``best.yaml``: dormancy gap minus BA drop."""
    return (m.asr_q or 0.0) - m.asr - m.ba_drop
