"""Spectral Signatures: per class, remove the samples that project most on the top singular direction.

Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018, arXiv:1811.00636. A
data-inspection defense: the defender holds the (poisoned) training set and a network trained on it (here
the attacked model, trained on exactly that set with the scenario's settings).

From the paper (Algorithm 1): for every label, the learned representations R of its examples, centred
(R - mean); the top right singular vector v of that matrix; the outlier score of each example is its
squared projection <R_i - mean, v>^2; the examples with the top 1.5 x eps x n scores of the label are
removed (eps: an upper bound on the poisoned share, n: the label's examples) and the network retrained from
scratch. The paper's experiments poison 5% and 10% of the target class (250 / 500 of CIFAR-10's 5,000). Its
public code (MadryLab/backdoor_data_poisoning, ``compute_corr.py``) scores only the target label, with
|projection| of the uncentred representations of an intermediate block, and removes a percentile (85th)
of them; we follow the paper's algorithm instead. Chosen here: the representation is the classifier's input
(the last hidden layer, pooled); every class is scored; ``eps`` defaults to 0.05 (the paper's smaller
setting). ``eps`` is a share of one class, not of the whole training set: a dirty-label all-to-one attack
at poison rate r over C balanced classes puts about r*C / (1 + r*(C-1)) poisoned samples in the target
class (10% over 10 classes: about 53%), so set ``eps`` with that in mind. The retraining uses the
scenario's train settings and seed.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from bench.defenses.base import Defense, DefenseContext, DefenseStage, check_range, snapshot
from bench.defenses.data_inspection import detection_metrics, penultimate, retrain, retrain_metrics
from bench.models.base import BenchModel
from bench.registry import register_defense

#: The paper removes 1.5 x eps x n of each label's examples.
REMOVAL_FACTOR = 1.5


def spectral_scores(features: torch.Tensor) -> torch.Tensor:
    """``[n]``: squared projection of each centred row of ``features`` on their top right singular vector."""
    centred = features.double() - features.double().mean(dim=0, keepdim=True)
    if centred.shape[0] < 2:
        return torch.zeros(centred.shape[0], dtype=torch.float64)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]).square()


@register_defense("spectral-signatures")
class SpectralSignatures(Defense):
    """Spectral Signatures (Tran, Li, Madry, NeurIPS 2018): per class, drop the top 1.5 eps n outlier scores.

    Arguments:
        eps (float): upper bound on the poisoned share of a class's training samples, in (0, 1/1.5];
            the top ``1.5 x eps x n`` scores of each class are removed. Default: 0.05 (the paper's
            experiments use 5% and 10%).
        retrain_epochs (int | None): epochs of the retraining from scratch; None: the scenario's
            ``train.epochs``. Default: None.

    Stages: "detected" (detection only: precision, recall, F1 of the removed samples against the truly
    poisoned ones, ``n_flagged``) and "retrained" (weights: a fresh model trained on the rest).
    Threat model (``sees``): the attacked model and the poisoned training set; no clean data.
    """

    stages = ("retrained",)
    name = "spectral-signatures"
    sees: ClassVar[frozenset[str]] = frozenset({"model", "poisoned"})
    #: toy-scale parameters for `bench run --smoke`
    smoke: ClassVar[dict[str, Any]] = {"retrain_epochs": 1}

    def __init__(self, eps: float = 0.05, retrain_epochs: int | None = None) -> None:
        check_range(self.name, "eps", eps, 0.0, 1.0 / REMOVAL_FACTOR, low_open=True,
                    what="upper bound on the poisoned share of a class; 1.5 x eps of each class is removed")
        if retrain_epochs is not None:
            check_range(self.name, "retrain_epochs", retrain_epochs, 1, what="None uses the scenario's train.epochs")
        self.eps = eps
        self.retrain_epochs = retrain_epochs
        self.budget = 0.0  # no clean data: the defender holds the poisoned training set instead

    def flag(self, model: BenchModel, ctx: DefenseContext) -> torch.Tensor:
        """``[N]`` bool over the poisoned training set: the removed samples of every class."""
        features = penultimate(model, ctx.poisoned_x, ctx.eval_batch_size).cpu()
        labels = ctx.poisoned_y.cpu()
        flags = torch.zeros(len(labels), dtype=torch.bool)
        for c in labels.unique().tolist():
            at = torch.nonzero(labels == c).flatten()
            remove = min(len(at), math.floor(REMOVAL_FACTOR * self.eps * len(at)))
            if remove:
                flags[at[spectral_scores(features[at]).topk(remove).indices]] = True
        return flags

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        flagged = self.flag(model, ctx)
        detected = DefenseStage("detected", None, detection_metrics(flagged, ctx.poisoned_truth, ctx.poisoned_y))
        keep = ~flagged
        retrained = retrain(ctx, keep, self.retrain_epochs)
        return [detected, DefenseStage("retrained", snapshot(retrained), retrain_metrics(keep))]
