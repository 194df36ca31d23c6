"""Activation Clustering: cluster each class's last-hidden-layer activations in two, drop the small cluster.

Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava, "Detecting Backdoor Attacks on Deep
Neural Networks by Activation Clustering", AAAI Workshop on Artificial Intelligence Safety (SafeAI) 2019,
arXiv:1811.03728. A data-inspection defense: the defender holds the (poisoned) training set and the model
trained on it, here the attacked model, which was trained on exactly that set with the scenario's settings.

From the paper: activations of the last hidden layer, segmented by training label; per class, reduced to
10 dimensions with ICA, then k-means with k = 2; the "relative size" analysis flags the smaller cluster when
it holds at most p of the class (the paper expects a poisoned cluster to be small); the flagged samples
are removed and the model retrained from scratch. From IBM ART's ``ActivationDefence`` (the authors'
public implementation): FastICA (``max_iter = 1000``, ``tol = 0.005``) to ``nb_dims = 10``,
``nb_clusters = 2``, ``size_threshold = 0.35`` (ART's
``relative-size`` analysis; its default, ``smaller``, flags the smaller cluster unconditionally; its
silhouette analysis is the paper's alternative, not used here). Chosen here: the features are the
classifier's input (for the built-in models, the pooled post-ReLU feature map), centred per class before
ICA (which whitens them) or PCA, at most as many dimensions as features; a class with fewer samples than
``2 x dims`` is left alone; ICA, k-means and the retraining are seeded with the cell's seed; the retraining
uses the scenario's train settings (epochs, optimizer, seed).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from bench.defenses.base import Defense, DefenseContext, DefenseStage, check_range, snapshot
from bench.defenses.data_inspection import detection_metrics, penultimate, retrain, retrain_metrics
from bench.errors import ComponentParamsError
from bench.models.base import BenchModel
from bench.registry import register_defense

Reduce = Literal["ica", "pca"]


def cluster_flags(features: np.ndarray, dims: int, reduce: Reduce, size_threshold: float, seed: int) -> np.ndarray:
    """``[n]`` bool: the smaller of two k-means clusters of ``features`` (reduced to ``dims``), when it holds
    at most ``size_threshold`` of the samples; all False otherwise."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA, FastICA

    n, width = features.shape
    flags = np.zeros(n, dtype=bool)
    if n < 2 * dims:
        return flags
    z = features - features.mean(axis=0)
    k = min(dims, width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FastICA's convergence warning on near-degenerate features
        if reduce == "ica":
            ica = FastICA(n_components=k, whiten="unit-variance", random_state=seed, max_iter=1000, tol=0.005)
            reduced = ica.fit_transform(z)
        else:
            reduced = PCA(n_components=k, random_state=seed).fit_transform(z)
        labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)
    sizes = np.bincount(labels, minlength=2)
    small = int(np.argmin(sizes))
    if sizes[small] / n <= size_threshold:
        flags[labels == small] = True
    return flags


@register_defense("activation-clustering")
class ActivationClustering(Defense):
    """Activation Clustering (Chen et al., SafeAI 2019): per class ICA to 10 dims, 2-means, drop a small cluster.

    Arguments:
        dims (int): dimensions the activations are reduced to. Default: 10 (paper, ART's ``nb_dims``).
        reduce (str): "ica" (FastICA: the paper and ART) or "pca". Default: "ica".
        size_threshold (float): the smaller cluster is flagged when it holds at most this share of its
            class, in (0, 0.5]. Default: 0.35 (ART's ``size_threshold``).
        retrain_epochs (int | None): epochs of the retraining from scratch; None: the scenario's
            ``train.epochs`` (the attacked model's budget). Default: None.

    Stages: "detected" (detection only: precision, recall, F1 of the flagged samples against the truly
    poisoned ones, ``n_flagged``, ``flagged_classes``) and "retrained" (weights: a fresh model trained on
    the training set minus the flagged samples).
    Threat model (``sees``): the attacked model and the poisoned training set; no clean data.
    """

    stages = ("retrained",)
    name = "activation-clustering"
    sees: ClassVar[frozenset[str]] = frozenset({"model", "poisoned"})
    #: toy-scale parameters for `bench run --smoke`
    smoke: ClassVar[dict[str, Any]] = {"retrain_epochs": 1}

    def __init__(
        self, dims: int = 10, reduce: Reduce = "ica", size_threshold: float = 0.35, retrain_epochs: int | None = None,
    ) -> None:
        check_range(self.name, "dims", dims, 1, what="dimensions after ICA / PCA")
        if reduce not in ("ica", "pca"):
            raise ComponentParamsError(f"{self.name}.reduce: must be 'ica' or 'pca', got {reduce!r}")
        check_range(self.name, "size_threshold", size_threshold, 0.0, 0.5, low_open=True,
                    what="largest share of a class the flagged cluster may hold")
        if retrain_epochs is not None:
            check_range(self.name, "retrain_epochs", retrain_epochs, 1, what="None uses the scenario's train.epochs")
        self.dims, self.reduce, self.size_threshold = dims, reduce, size_threshold
        self.retrain_epochs = retrain_epochs
        self.budget = 0.0  # no clean data: the defender holds the poisoned training set instead

    def flag(self, model: BenchModel, ctx: DefenseContext) -> torch.Tensor:
        """``[N]`` bool over the poisoned training set: the samples of every flagged cluster."""
        features = penultimate(model, ctx.poisoned_x, ctx.eval_batch_size).cpu().numpy().astype(np.float64)
        labels = ctx.poisoned_y.cpu().numpy()
        flags = np.zeros(len(labels), dtype=bool)
        for c in np.unique(labels):
            at = np.nonzero(labels == c)[0]
            flags[at] = cluster_flags(features[at], self.dims, self.reduce, self.size_threshold, ctx.seed)
        return torch.from_numpy(flags)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        flagged = self.flag(model, ctx)
        detected = DefenseStage("detected", None, detection_metrics(flagged, ctx.poisoned_truth, ctx.poisoned_y))
        keep = ~flagged
        retrained = retrain(ctx, keep, self.retrain_epochs)
        return [detected, DefenseStage("retrained", snapshot(retrained), retrain_metrics(keep))]
