"""Activation Clustering, Spectral Signatures and ABL on a BadNets-poisoned tiny pMoE (16x16 digits).

Measured here (seed 0, 3% poisoned = 43 of 1,438, all relabelled 0, so about 24% of class 0; attacked model:
BA 0.93, ASR 0.99 after 4 epochs): AC with PCA finds all 43 in class 0, with ICA about half of them; SS
with eps 0.16 ranks the 43 on top of class 0; ABL's 1% isolated after 5 LGA epochs are mostly poisoned.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bench.attacks.badnets import BadNets
from bench.defenses.abl import AntiBackdoorLearning
from bench.defenses.activation_clustering import ActivationClustering, cluster_flags
from bench.defenses.base import DefenseContext
from bench.defenses.data_inspection import penultimate
from bench.defenses.spectral_signatures import SpectralSignatures
from bench.errors import ComponentParamsError
from bench.evaluate import evaluate
from bench.jobs import build_model, poisoned_training_data
from bench.registry import REGISTRY
from bench.scenario import TrainSpec
from bench.train import fit
from tests.conftest import FP32

MODEL = {"name": "pmoe", "width": 1, "experts": 2, "topk": 4}
TARGET = 0


@pytest.fixture(scope="module")
def attacked(one_thread):
    data = REGISTRY.get("dataset", "digits").create(image_size=16)
    trigger = BadNets(size=2, position="top-left")
    spec = {"attack": {"name": "badnets", "target": TARGET}, "poison_rate": 0.03, "seed": 0}
    poisoned = poisoned_training_data(spec, data, trigger)
    cfg = TrainSpec(epochs=4, batch_size=32, lr=0.05, **FP32).model_dump()

    def fresh():
        torch.manual_seed(0)
        return build_model(MODEL, data)

    model = fresh()
    fit(model, poisoned.x, poisoned.y, cfg, seed=0)
    before = evaluate(model, data, trigger, TARGET)
    assert before["asr"] > 0.9 and before["ba"] > 0.85, before
    return data, trigger, poisoned, cfg, fresh, model, before


def context(attacked, sees: frozenset[str]) -> DefenseContext:
    data, _, poisoned, cfg, fresh, *_ = attacked
    return DefenseContext(clean_x=data.train_x[:0], clean_y=data.train_y[:0], train_cfg=cfg, seed=0,
                          num_classes=data.num_classes, defense="test", sees=sees, poisoned=poisoned, fresh_model=fresh)


def test_activation_clustering_flags_the_poisoned_cluster_of_the_target_class(attacked):
    model, truth = attacked[5], attacked[2].truth
    ctx = context(attacked, ActivationClustering.sees)
    flagged = ActivationClustering(reduce="pca").flag(model, ctx)
    in_target = attacked[2].y == TARGET
    hits = int((flagged & truth).sum())
    assert hits / int(truth.sum()) >= 0.9  # recall (measured: 43 / 43)
    assert hits / int((flagged & in_target).sum()) >= 0.9  # precision within the target class (measured: 1.0)
    # the paper's ICA (the default), on the target class: part of the poisoned cluster, nothing clean
    at = torch.nonzero(in_target).flatten()
    features = penultimate(model, attacked[2].x[at]).double().numpy()
    ica = torch.from_numpy(cluster_flags(features, 10, "ica", 0.35, seed=0))
    assert int((ica & truth[at]).sum()) > 0.25 * int(truth.sum()) and int((ica & ~truth[at]).sum()) == 0


def test_spectral_signatures_ranks_the_poisoned_samples_on_top(attacked):
    model, truth, y = attacked[5], attacked[2].truth, attacked[2].y
    flagged = SpectralSignatures(eps=0.16).flag(model, context(attacked, SpectralSignatures.sees))
    in_target = y == TARGET
    assert int((flagged & truth).sum()) / int(truth.sum()) >= 0.9  # recall (measured: 43 / 43)
    assert int((flagged & in_target).sum()) == int(1.5 * 0.16 * int(in_target.sum()))  # 1.5 eps n per class
    assert int((flagged & truth).sum()) / int((flagged & in_target).sum()) >= 0.9  # target-class precision


def test_abl_isolates_mostly_poisoned_samples_and_lowers_the_asr(attacked):
    data, trigger, _, _, fresh, _, before = attacked
    defense = AntiBackdoorLearning(isolation_epochs=5, finetune_epochs=1, unlearning_epochs=5)
    isolated, unlearned = defense.run(fresh(), context(attacked, AntiBackdoorLearning.sees))
    assert isolated.state is None and isolated.metrics["n_flagged"] == round(0.01 * len(data.train_y))
    assert isolated.metrics["precision"] >= 0.7  # measured 0.86 (12 of 14)
    model = fresh()
    model.load_state_dict(unlearned.state)
    after = evaluate(model, data, trigger, TARGET)
    assert after["asr"] < before["asr"] - 0.3 and after["ba"] > 0.8, (before, after)


def test_retraining_without_the_flagged_samples_removes_the_backdoor(attacked):
    data, trigger, _, _, fresh, model, before = attacked
    detected, retrained = SpectralSignatures(eps=0.16, retrain_epochs=2).run(
        copy.deepcopy(model), context(attacked, SpectralSignatures.sees))
    assert detected.metrics["recall"] >= 0.9 and retrained.metrics["n_removed"] == detected.metrics["n_flagged"]
    clean = fresh()
    clean.load_state_dict(retrained.state)
    after = evaluate(clean, data, trigger, TARGET)
    assert after["asr"] < 0.2 and after["ba"] > 0.85, (before, after)


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("activation-clustering", {"size_threshold": 0.6}, "activation-clustering.size_threshold"),
        ("activation-clustering", {"dims": 0}, "activation-clustering.dims"),
        ("spectral-signatures", {"eps": 0.0}, "spectral-signatures.eps"),
        ("spectral-signatures", {"eps": 0.8}, "spectral-signatures.eps"),
        ("abl", {"isolation_ratio": 0.0}, "abl.isolation_ratio"),
        ("abl", {"gamma": -1.0}, "abl.gamma"),
        ("abl", {"unlearning_epochs": 0}, "abl.unlearning_epochs"),
    ],
)
def test_bad_parameters_name_the_field(name, params, field):
    with pytest.raises(ComponentParamsError, match=field):
        REGISTRY.get("defense", name).create(**params)
