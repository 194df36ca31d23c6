"""STRIP's defaults against the authors' notebook (garrisongys/STRIP, ``STRIP_CIFAR10DeepArchit_Tb.ipynb``):
``n_sample = 100`` overlays, a threshold at the 1% quantile of a normal fitted (``scipy.stats.norm.fit``)
to clean entropies, overlays drawn from images disjoint from the inputs they are superimposed on; and our
clipped addition.

One tiny backdoored pMoE (digits at 8x8, a 2x2 white BadNets square top-left, target 0) is trained once.
"""

from __future__ import annotations

import pytest
import scipy.stats
import torch

from bench.attacks import BadNets, poison_training_set
from bench.data.base import TensorData
from bench.defenses import DefenseContext, Strip, strip_entropy
from bench.defenses.strip import normal_threshold, superimposed
from bench.errors import ComponentParamsError
from bench.jobs import build_model, defender_data
from bench.models.base import BenchModel
from bench.scenario import TrainSpec
from bench.train import fit

TARGET = 0


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model(digits8: TensorData) -> BenchModel:
    """A width-1 pMoE with a BadNets backdoor (4 epochs, as the defenses' fixture)."""
    torch.manual_seed(0)
    net = build_model({"name": "pmoe", "width": 1, "experts": 2, "topk": 2}, digits8)
    poisoned = poison_training_set(digits8.train_x, digits8.train_y, BadNets(size=2, position="top-left"),
                                   TARGET, 0.1, seed=0)
    fit(net, poisoned.x, poisoned.y, TrainSpec(epochs=4, batch_size=64, lr=0.05).model_dump(), seed=0)
    return net.eval()


def context(data: TensorData, budget: float = 0.05, seed: int = 0, **kw) -> DefenseContext:
    """The defender's data drawn as the engine draws it."""
    x, y = defender_data(data, budget, seed)
    cfg = TrainSpec(epochs=1).model_dump()
    return DefenseContext(clean_x=x, clean_y=y, train_cfg=cfg, seed=seed, num_classes=data.num_classes,
                          test_x=data.test_x, test_y=data.test_y, **kw)


def entropy_by_hand(model: BenchModel, x: torch.Tensor, overlays: torch.Tensor, clip: bool) -> float:
    """Mean entropy (bits) of one input superimposed with each overlay, one prediction at a time."""
    values = []
    with torch.no_grad():
        for overlay in overlays:
            mixed = x + overlay
            probs = model((mixed.clamp(0, 1) if clip else mixed)[None]).softmax(1)[0].double()
            values.append(float(-(probs * torch.log2(probs.clamp_min(1e-12))).sum()))
    return sum(values) / len(values)


def test_threshold_inputs_are_never_superimposed_on_themselves(digits8, model) -> None:
    """The overlays come from a pool disjoint from the images that set the threshold, as in their notebook
    (overlays x_train[40000:49999], clean inputs x_train[26000:28000])."""
    ctx = context(digits8)
    strip = Strip()
    draw = strip.threshold_draw(ctx)
    pool, inputs = set(draw.pool.tolist()), set(draw.inputs.tolist())
    assert not pool & inputs and pool | inputs == set(range(len(ctx.clean_x)))
    assert len(pool) == round(0.5 * len(ctx.clean_x))
    assert set(draw.overlays.flatten().tolist()) <= pool  # every drawn overlay is a pool image ...
    assert not (draw.overlays == draw.inputs[:, None]).any()  # ... so no input ever meets itself
    # run() thresholds with exactly this draw: the same threshold from the draw by hand
    (stage,) = strip.run(model, ctx)
    entropies = strip_entropy(model, ctx.clean_x[draw.inputs], ctx.clean_x, draw.overlays, "add")
    assert stage.metrics["threshold"] == pytest.approx(normal_threshold(entropies, 0.01), abs=1e-9)
    assert (stage.metrics["n_overlay_pool"], stage.metrics["n_threshold"]) == (len(pool), len(inputs))
    # a self-overlay lowers the entropy: the bias the disjoint pool removes
    x = ctx.clean_x[draw.inputs[:20]]
    own = strip_entropy(model, x, x, torch.arange(20)[:, None].repeat(1, 4), "add")
    assert own.mean() < entropies[:20].mean()


def test_default_n_is_100_overlays_per_input(digits8, model) -> None:
    ctx = context(digits8)
    draw = Strip().threshold_draw(ctx)
    assert draw.overlays.shape == (len(draw.inputs), 100)
    got = strip_entropy(model, ctx.clean_x[draw.inputs[:2]], ctx.clean_x, draw.overlays[:2], "add")
    for i in range(2):  # the score is the mean over those 100 superimposed predictions
        want = entropy_by_hand(model, ctx.clean_x[draw.inputs[i]], ctx.clean_x[draw.overlays[i]], clip=True)
        assert float(got[i]) == pytest.approx(want, abs=1e-5)


def test_default_threshold_is_their_normal_fit_at_frr_1_percent(digits8, model) -> None:
    ctx = context(digits8)
    strip = Strip()
    (stage,) = strip.run(model, ctx)
    draw = strip.threshold_draw(ctx)
    entropies = strip_entropy(model, ctx.clean_x[draw.inputs], ctx.clean_x, draw.overlays, "add")
    mu, sigma = scipy.stats.norm.fit(entropies.double().numpy())  # their cell: norm.fit, then norm.ppf(0.01)
    assert stage.metrics["threshold"] == pytest.approx(scipy.stats.norm.ppf(0.01, loc=mu, scale=sigma), abs=1e-9)
    # the rule's meaning: 1% of a large normal sample falls below it
    sample = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3 + 2.0
    assert float((sample < normal_threshold(sample, 0.01)).double().mean()) == pytest.approx(0.01, abs=0.001)


def test_default_superimposition_adds_and_clips_to_the_pixel_range(digits8, model) -> None:
    ctx = context(digits8)
    strip = Strip()
    assert strip.superimpose == "add"
    x, overlays = ctx.clean_x[:3], ctx.clean_x[3:5][None].repeat(3, 1, 1, 1, 1)
    assert torch.equal(superimposed(x, overlays, "add"), (x[:, None] + overlays).clamp(0, 1))
    assert superimposed(x, overlays, "add_unclipped").max() > 1  # their float cv2.addWeighted, unsaturated
    draw = strip.threshold_draw(ctx)
    got = strip_entropy(model, ctx.clean_x[draw.inputs[:1]], ctx.clean_x, draw.overlays[:1], strip.superimpose)
    raw = entropy_by_hand(model, ctx.clean_x[draw.inputs[0]], ctx.clean_x[draw.overlays[0]], clip=False)
    clipped = entropy_by_hand(model, ctx.clean_x[draw.inputs[0]], ctx.clean_x[draw.overlays[0]], clip=True)
    assert float(got[0]) == pytest.approx(clipped, abs=1e-5) and clipped != pytest.approx(raw, abs=1e-3)


def test_default_strip_separates_triggered_inputs(digits8, model) -> None:
    """With every default (n = 100, 5% budget split in half), on the backdoored model."""
    trigger = BadNets(size=2, position="top-left")
    (stage,) = Strip(test_limit=150).run(model, context(digits8, trigger=trigger, target=TARGET))
    m = stage.metrics
    assert m["auroc"] > 0.95 and m["tpr"] > 0.9 and m["frr"] < 0.05


def test_too_few_defender_images_for_a_disjoint_split_is_a_clear_error(digits8, model) -> None:
    ctx = context(digits8, budget=0.0015)  # 2 images
    with pytest.raises(ComponentParamsError, match="at least 3 clean images"):
        Strip().run(model, ctx)
    with pytest.raises(ComponentParamsError, match="overlay_share"):
        Strip(overlay_share=1.0)
