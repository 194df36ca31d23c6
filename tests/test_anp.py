"""ANP (Wu & Wang, NeurIPS 2021): the neuron perturbation stays within eps and raises the loss, masks are
learnt in [0, 1] without touching the attacked model, and pruning zeroes exactly the chosen BatchNorm
neurons (weight only, as their code; bias too with ``zero_bias``).

One tiny backdoored pMoE (digits at 8x8, BadNets, target 0, 10% poisoned) is trained once for the file.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bench.data.base import TensorData
from bench.defenses.anp import (
    ANP,
    NeuronPerturbation,
    batchnorms,
    chosen_neurons,
    learn_masks,
    perturb,
    prune_neurons,
)
from bench.errors import BenchError, ComponentParamsError
from bench.jobs import build_model
from bench.models.base import BenchModel
from bench.registry import REGISTRY
from tests.conftest import TINY_PMOE, backdoored_copy, defense_cfg, defense_ctx

TINY = TINY_PMOE

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


cfg = defense_cfg


ctx_for = defense_ctx


@pytest.fixture(scope="module")
def backdoored(digits8: TensorData, badnets_digits8_state: dict[str, torch.Tensor]) -> BenchModel:
    return backdoored_copy(digits8, badnets_digits8_state)  # trained once per session (conftest)


def test_neurons_are_every_affine_batchnorm_channel(digits8):
    model = build_model(TINY, digits8)
    names = [n for n, _ in batchnorms(model)]
    assert "head_norm" in names and "embed.norm" in names and "moe.experts.1.norm" in names
    assert all(n.startswith(("trunk.", "embed.", "moe.", "head_norm")) for n in names)
    dense = build_model({"name": "dense", "width": 1}, digits8)
    assert sum(bn.num_features for _, bn in batchnorms(dense)) == sum(
        m.num_features for m in dense.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("steps", [1, 3])
def test_the_perturbation_stays_within_eps_and_raises_the_loss(digits8, backdoored, steps):
    work = copy.deepcopy(backdoored).train()
    layers = batchnorms(work)
    state = NeuronPerturbation.ones(layers)
    x, y = digits8.train_x[:128], digits8.train_y[:128]
    eps = 0.4
    perturb(work, layers, state, x, y, eps, steps, torch.Generator().manual_seed(0))
    noise = torch.cat([t.detach().flatten() for t in state.noise_w + state.noise_b])
    assert noise.abs().max() <= eps + 1e-7
    assert (noise.abs() > eps - 1e-6).float().mean() > 0.3  # signed steps push many to the bound
    with torch.no_grad():
        natural = F.cross_entropy(functional_call(work, state.overrides(layers, False), (x,)), y)
        perturbed = F.cross_entropy(functional_call(work, state.overrides(layers, True), (x,)), y)
        for t in state.noise_w + state.noise_b:  # a random perturbation of the same size, for comparison
            t.copy_((torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * eps)
        random = F.cross_entropy(functional_call(work, state.overrides(layers, True), (x,)), y)
    assert perturbed > random > natural, (natural, random, perturbed)


def test_the_perturbation_scales_weights_and_biases_multiplicatively(digits8):
    model = build_model(TINY, digits8)
    layers = batchnorms(model)
    state = NeuronPerturbation.ones(layers)
    with torch.no_grad():
        state.masks[0].fill_(0.5)
        state.noise_w[0].fill_(0.25)
        state.noise_b[0].fill_(-0.5)
    name, bn = layers[0]
    plain, noisy = state.overrides(layers, False), state.overrides(layers, True)
    assert torch.allclose(plain[f"{name}.weight"], bn.weight * 0.5) and plain[f"{name}.bias"] is bn.bias
    assert torch.allclose(noisy[f"{name}.weight"], bn.weight * 0.75)
    assert torch.allclose(noisy[f"{name}.bias"], bn.bias * 0.5)


def test_masks_are_learnt_in_the_unit_interval_on_a_copy(digits8, backdoored):
    before = {k: v.clone() for k, v in backdoored.state_dict().items()}
    ctx = ctx_for(digits8)
    state = learn_masks(backdoored, ctx.clean_x, ctx.clean_y, eps=0.4, steps=1, alpha=0.2, iterations=8, lr=0.2,
                        batch_size=32, generator=torch.Generator().manual_seed(0))
    masks = state.flat_masks()
    assert len(masks) == sum(bn.num_features for _, bn in batchnorms(backdoored))
    assert masks.min() >= 0 and masks.max() <= 1 and masks.min() < 1  # they moved, and stayed clipped
    after = backdoored.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics included


@pytest.mark.parametrize("zero_bias", [False, True])
def test_pruning_zeroes_exactly_the_chosen_neurons(digits8, zero_bias):
    model = build_model(TINY, digits8)
    layers = batchnorms(model)
    with torch.no_grad():
        for _, bn in layers:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(0.5, 1.5)
    before = {n: (bn.weight.clone(), bn.bias.clone()) for n, bn in layers}
    total = sum(bn.num_features for _, bn in layers)
    masks = torch.rand(total, generator=torch.Generator().manual_seed(0))
    masks[[0, 17, total - 1]] = torch.tensor([0.1, 0.2, 0.05])  # 0.2 itself is pruned (their "<= threshold")
    chosen = chosen_neurons(masks, "threshold", 0.2, 0.0)
    assert set(chosen.tolist()) == set(torch.nonzero(masks <= 0.2).flatten().tolist()) >= {0, 17, total - 1}
    counts = prune_neurons(layers, chosen, zero_bias)
    assert sum(counts.values()) == len(chosen)
    weights = torch.cat([bn.weight.detach() for _, bn in layers])
    biases = torch.cat([bn.bias.detach() for _, bn in layers])
    old_w = torch.cat([w for w, _ in before.values()])
    old_b = torch.cat([b for _, b in before.values()])
    pruned = torch.zeros(total, dtype=torch.bool)
    pruned[chosen] = True
    assert torch.equal(weights[pruned], torch.zeros(int(pruned.sum())))
    assert torch.equal(weights[~pruned], old_w[~pruned])
    assert torch.equal(biases, torch.where(pruned, torch.zeros_like(old_b), old_b) if zero_bias else old_b)


def test_pruning_by_fraction_takes_the_lowest_masks():
    masks = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.0, 0.7, 1.0, 0.2, 0.6, 0.4])
    assert sorted(chosen_neurons(masks, "fraction", 0.0, 0.3).tolist()) == [1, 4, 7]
    assert len(chosen_neurons(masks, "fraction", 0.0, 0.05)) == 0


def test_the_stage_reports_the_pruned_neurons(digits8, backdoored):
    model = copy.deepcopy(backdoored)
    (stage,) = ANP(iterations=3, batch_size=32, prune_by="fraction", fraction=0.1).run(model, ctx_for(digits8))
    total = sum(bn.num_features for _, bn in batchnorms(model))
    assert stage.name == "pruned" and stage.metrics["neurons"] == total
    assert stage.metrics["pruned"] == int(0.1 * total)
    zeroed = sum(int((stage.state[f"{n}.weight"] == 0).sum()) for n, _ in batchnorms(model))
    assert zeroed == stage.metrics["pruned"]
    parts = {k: v for k, v in stage.metrics.items() if k.startswith("pruned_") and k != "pruned_share"}
    assert sum(parts.values()) == stage.metrics["pruned"] and set(parts) <= {
        "pruned_trunk", "pruned_embed", "pruned_moe", "pruned_head_norm"}


def test_a_model_without_batchnorm_is_a_clear_error(digits8):
    class Flat(BenchModel):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
            return self.fc(x.flatten(1)), None

    with pytest.raises(BenchError, match="no affine BatchNorm"):
        ANP(iterations=1).run(Flat(), ctx_for(digits8))


@pytest.mark.parametrize(
    ("params", "field"),
    [({"eps": 1.5}, "anp.eps"), ({"anp_steps": 0}, "anp.anp_steps"), ({"anp_alpha": -0.1}, "anp.anp_alpha"),
     ({"iterations": 0}, "anp.iterations"), ({"lr": 0.0}, "anp.lr"), ({"threshold": 1.2}, "anp.threshold"),
     ({"fraction": 1.0}, "anp.fraction"), ({"prune_by": "number"}, "prune_by"), ({"budget": 2.0}, "anp.budget")],
)
def test_bad_params_name_the_field(params, field):
    with pytest.raises(ComponentParamsError, match=field):
        REGISTRY.get("defense", "anp").create(**params)


def test_registered_with_the_papers_defaults_and_threat_model():
    comp = REGISTRY.get("defense", "anp")
    defaults = {p.name: p.default for p in comp.params}
    assert (defaults["eps"], defaults["anp_steps"], defaults["anp_alpha"]) == (0.4, 1, 0.2)
    assert (defaults["iterations"], defaults["lr"], defaults["threshold"], defaults["budget"]) == (2000, 0.2, 0.2, 0.01)
    assert comp.factory.sees == frozenset({"model", "clean"}) and comp.factory.stages == ("pruned",)
