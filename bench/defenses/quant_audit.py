"""Quantization audit: flag a model whose behaviour under quantization changes the way a dormant backdoor does.

The quantization-conditioned backdoor literature's pre-deployment checks: "quantization noise auditing"
(evaluate the released fp32 model under the quantizers a deployer may use and compare) and "adversarial
quantization testing" (search for a trigger against the quantized model). Threat: Ma et al., "Quantization
Backdoors to Deep Learning Commercial Frameworks", TDSC 2023 (https://arxiv.org/abs/2108.09187); Hong et
al., "Qu-ANTI-zation: Exploiting Quantization Artifacts for Achieving Adversarial Outcomes",
NeurIPS 2021 (https://arxiv.org/abs/2110.13541), who suggest checking the model under several precisions;
Li et al. (EFRAP, CVPR 2024, https://arxiv.org/abs/2405.12725) discuss why fp32 scans miss such backdoors.
The statistics and thresholds below are ours; the defender uses clean data only (``ctx.trigger`` and
``ctx.target`` serve only the labelled ``correct_class`` metric).

Battery: every ``bits x scopes x granularity x symmetric`` PTQ config the model supports (scopes the model
lacks are skipped, see :func:`bench.applicability.model_capabilities`). Two statistics per config:

(a) **Directed drift** on the defender's clean images: ``flip`` is the share whose predicted class changes
    against fp32; ``directed`` is the share that flips *into* the single most common new class. Benign
    quantization noise scatters its flips; a dormant backdoor pulls them into its target class (on our
    digits qcb model at int4: 7.8% flipped, 5% into the target; clean: 0.6%, one image).
(b) **Trigger that exists only when quantized**: Neural Cleanse's reverse engineering
    (:func:`bench.defenses.neural_cleanse.reverse_engineer`, a short run) against the fp32 model and
    against the quantized one, at the configs of the lowest audited bit-width; ``ratio`` = smallest fp32
    mask L1 norm / smallest quantized one. A dormant backdoor has a small mask only when quantized
    (ratio >> 1); a clean or ordinary backdoored model gives about 1 (an ordinary backdoor's trigger is
    as small at fp32: that is Neural Cleanse's job, not this audit's).

Score of a config: ``max(directed / drift_threshold, ratio / ratio_threshold)``; ``audit_score`` is the
largest over the battery, ``worst_config`` where, ``flagged`` = ``audit_score >= 1``. Defaults
``drift_threshold = 0.03`` (3% of clean images pulled into one class) and ``ratio_threshold = 2`` (the
quantized model's smallest trigger at most half the fp32 one) are ours.

Detection only: one stage "audited" with ``state=None``.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import torch

from bench.applicability import model_capabilities
from bench.defenses.base import DEFAULT_BUDGET, Defense, DefenseContext, DefenseStage, check_budget, check_range
from bench.defenses.neural_cleanse import ReverseSpec, reverse_engineer, scanned_classes
from bench.errors import ComponentParamsError
from bench.models.base import BenchModel
from bench.quant import QuantConfig, QuantError, normalize_bits, quantized, scope_parameters
from bench.registry import register_defense

Metric = float | int | str


def key(config: QuantConfig) -> str:
    """A metric-name form of a config's label: ``int4/whole/channel`` -> ``int4_whole_channel``."""
    return config.label.replace("/", "_")


@torch.no_grad()
def predictions(model: BenchModel, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Predicted classes of ``x`` (eval mode)."""
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def drift(before: torch.Tensor, after: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``flip``: share of predictions changed; ``directed``: share flipped into the most common new class;
    ``into``: that class (-1 if nothing flipped)."""
    flipped = after != before
    into = torch.bincount(after[flipped], minlength=num_classes)
    n = max(1, len(before))
    top = int(into.argmax()) if bool(flipped.any()) else -1
    return {"flip": float(flipped.float().mean()) if len(before) else 0.0,
            "directed": float(into.max()) / n if bool(flipped.any()) else 0.0, "into": top}


def battery(model: BenchModel, bits: list[int], scopes: list[str], granularity: list[str],
            symmetric: list[bool]) -> tuple[list[QuantConfig], list[str]]:
    """The supported configs, and the scopes skipped because the model lacks them."""
    caps = model_capabilities(model)
    usable, skipped = [], []
    for scope in scopes:
        try:
            if scope != "whole" and scope not in caps:
                raise QuantError(scope)
            scope_parameters(model, scope)
            usable.append(scope)
        except QuantError:
            skipped.append(scope)
    configs = [QuantConfig(bits=b, scope=s, granularity=g, symmetric=sym)  # type: ignore[arg-type]
               for b, s, g, sym in itertools.product(bits, usable, granularity, symmetric)]
    return configs, skipped


def min_norm(model: BenchModel, x: torch.Tensor, classes: list[int], spec: ReverseSpec, seed: int) -> tuple[float, int]:
    """Smallest reversed-trigger mask L1 norm over ``classes`` and its class."""
    found = reverse_engineer(model, x, classes, spec, seed)
    best = min(found, key=lambda t: t.norm)
    return best.norm, best.target


@register_defense("quant-audit")
class QuantAudit(Defense):
    """Quantization audit: clean-data drift and reversed triggers under a battery of fake quantizers,
    flagging dormant (quantization-conditioned) backdoors. See the module docstring for the statistics.

    Arguments:
        bits (list[int]): bit-widths audited. Default: [8, 6, 4].
        scopes (list[str]): scopes audited; those the model lacks are skipped. Default: whole, gate, experts.
        granularity (list[str]): "tensor" and/or "channel". Default: ["tensor", "channel"].
        symmetric (list[bool]): asymmetric and/or symmetric grids. Default: [False].
        reverse_bits (int | None): bit-width whose configs get the reverse-engineering test; None: the
            lowest of ``bits``. Default: None.
        reverse_steps (int): Neural Cleanse optimizer steps per run; 0 skips test (b). Default: 200.
        reverse_batch (int): clean images per reverse-engineering step. Default: 16.
        classes (list[int] | None): classes reverse-engineered; None: all. Default: None.
        drift_threshold (float): share of clean images flipped into one class that scores 1. Default: 0.03.
        ratio_threshold (float): fp32 / quantized smallest mask norm that scores 1. Default: 2.
        budget (float): share of the clean training set the defender holds. Default: 0.05.

    Stage: "audited" (no weights): ``audit_score``, ``flagged`` (0/1), ``worst_config``, ``flip_<config>``
    per config, ``directed``/``into_class`` at the worst drift, ``norm_fp32``, ``norm_<config>``,
    ``ratio_<config>``, and ``correct_class`` (the quantized smallest-mask class is the attack's target)
    when the benchmark knows the attack.
    """

    stages = ()
    name = "quant-audit"
    #: toy-scale parameters for `bench run --smoke`
    smoke: ClassVar[dict[str, Any]] = {"bits": [4], "granularity": ["tensor"], "reverse_steps": 2,
                                       "reverse_batch": 8, "classes": [0, 1, 2]}

    def __init__(
        self,
        bits: list[int] | None = None,
        scopes: list[str] | None = None,
        granularity: list[str] | None = None,
        symmetric: list[bool] | None = None,
        reverse_bits: int | None = None,
        reverse_steps: int = 200,
        reverse_batch: int = 16,
        classes: list[int] | None = None,
        drift_threshold: float = 0.03,
        ratio_threshold: float = 2.0,
        budget: float = DEFAULT_BUDGET,
    ) -> None:
        self.bits = [8, 6, 4] if bits is None else list(bits)
        self.scopes = ["whole", "gate", "experts"] if scopes is None else list(scopes)
        self.granularity = ["tensor", "channel"] if granularity is None else list(granularity)
        self.symmetric = [False] if symmetric is None else list(symmetric)
        for field_name, values in (("bits", self.bits), ("scopes", self.scopes),
                                   ("granularity", self.granularity), ("symmetric", self.symmetric)):
            if not values:
                raise ComponentParamsError(f"{self.name}.{field_name}: give at least one value")
        for b in self.bits:
            if isinstance(b, bool) or normalize_bits_or_none(b) is None:
                raise ComponentParamsError(f"{self.name}.bits: integer bit-widths in 2..16 (fp32 is the reference "
                                           f"every config is compared with), got {b!r}")
        try:
            for s, g, sym in itertools.product(self.scopes, self.granularity, self.symmetric):
                QuantConfig.from_dict({"bits": 4, "scope": s, "granularity": g, "symmetric": sym}, where=self.name)
        except QuantError as exc:
            raise ComponentParamsError(str(exc)) from None
        self.reverse_bits = min(self.bits) if reverse_bits is None else reverse_bits
        if self.reverse_bits not in self.bits:
            raise ComponentParamsError(f"{self.name}.reverse_bits: must be one of bits {self.bits}, got {reverse_bits}")
        check_range(self.name, "reverse_steps", reverse_steps, 0, what="0 skips the reverse-engineering test")
        check_range(self.name, "reverse_batch", reverse_batch, 1)
        check_range(self.name, "drift_threshold", drift_threshold, 0.0, 1.0, low_open=True)
        check_range(self.name, "ratio_threshold", ratio_threshold, 1.0, low_open=True)
        self.reverse = ReverseSpec(steps=max(1, reverse_steps), batch_size=reverse_batch, patience=1,
                                   lambda_init=1e-2)
        self.reverse_steps = reverse_steps
        self.classes = classes
        self.drift_threshold = drift_threshold
        self.ratio_threshold = ratio_threshold
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        model.eval()
        configs, skipped = battery(model, self.bits, self.scopes, self.granularity, self.symmetric)
        if not configs:
            raise ComponentParamsError(f"{self.name}.scopes: the model supports none of {self.scopes}")
        x, batch = ctx.clean_x, ctx.eval_batch_size
        before = predictions(model, x, batch)
        metrics: dict[str, Metric] = {"configs": len(configs), "skipped_scopes": ",".join(skipped) or "-"}
        scores: dict[str, float] = {}
        worst_drift: tuple[float, int] = (0.0, -1)
        for config in configs:
            with quantized(model, config):
                d = drift(before, predictions(model, x, batch), ctx.num_classes)
            metrics[f"flip_{key(config)}"] = d["flip"]
            scores[config.label] = d["directed"] / self.drift_threshold
            if d["directed"] > worst_drift[0]:
                worst_drift = (d["directed"], int(d["into"]))
        metrics["directed"], metrics["into_class"] = worst_drift
        if self.reverse_steps > 0:
            self._reverse(model, ctx, [c for c in configs if c.bits == self.reverse_bits], metrics, scores)
        worst = max(scores, key=lambda k: scores[k])
        metrics.update(audit_score=scores[worst], flagged=int(scores[worst] >= 1.0), worst_config=worst)
        return [DefenseStage("audited", None, metrics)]

    def _reverse(self, model: BenchModel, ctx: DefenseContext, configs: list[QuantConfig],
                 metrics: dict[str, Metric], scores: dict[str, float]) -> None:
        """Test (b): smallest reversed mask at fp32 against each config's; fills metrics and scores."""
        classes = scanned_classes(self.name, self.classes, ctx.num_classes)
        fp32_norm, _ = min_norm(model, ctx.clean_x, classes, self.reverse, ctx.seed)
        metrics["norm_fp32"] = fp32_norm
        best: tuple[float, int] = (0.0, -1)
        for config in configs:
            with quantized(model, config):
                norm, cls = min_norm(model, ctx.clean_x, classes, self.reverse, ctx.seed)
            ratio = fp32_norm / max(norm, 1e-12)
            metrics[f"norm_{key(config)}"], metrics[f"ratio_{key(config)}"] = norm, ratio
            scores[config.label] = max(scores[config.label], ratio / self.ratio_threshold)
            if ratio > best[0]:
                best = (ratio, cls)
        metrics["ratio"], metrics["quant_min_class"] = best
        if ctx.target is not None:
            metrics["correct_class"] = int(best[1] == ctx.target)


def normalize_bits_or_none(bits: Any) -> int | None:
    """``bits`` as an integer bit-width, or None when it is fp32 or invalid."""
    try:
        return normalize_bits(bits)
    except QuantError:
        return None
