"""Routing analysis: metrics, map data and pictures against a pMoE whose routing is set by hand, and
``bench analyze`` end to end on a tiny stored run.

The hand-set model ("transparent pMoE") passes each patch's top-left pixel straight to the router: the
trunk's residual branches are zeroed and its shortcuts copy channel 0, so the routed feature of patch
``(i, j)`` is ``x[4i, 4j]``. A router kernel of +1 then keeps the ``k`` brightest patches, -1 the ``k``
darkest; images made of constant 4x4 patches therefore have a routing we can write down.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from bench.analysis import (
    RoutingTally,
    draw_frequency_maps,
    draw_patch_values,
    draw_selection_maps,
    expert_overlap,
    expert_patch_values,
    highlight,
    load_cv,
    patch_means,
    patch_touch_mask,
    routing_metrics,
    selection_frequency,
    selection_jaccard,
    selection_masks,
)
from bench.analysis.cells import select_groups
from bench.analysis.maps import FADE, FADE_COLOR, HIST_BINS, value_shares
from bench.analysis.routing import NoRoutingError
from bench.attacks import BadNets, BadPatches, Blend
from bench.cli import app
from bench.cli.analysis import analyze
from bench.registry import REGISTRY
from bench.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")  # routing maps compared exactly (conftest.py)


SIZE, GRID, PATCH = 16, 4, 4  # 16x16 input -> 4x4 grid of 4x4-pixel patches


def transparent_pmoe(signs: list[float], topk: int) -> nn.Module:
    """A registry-built pMoE whose router scores patch (i, j) as ``sign_e * x[4i, 4j]``."""
    model = REGISTRY.get("model", "pmoe").create(
        input_shape=(1, SIZE, SIZE), num_classes=2, mean=(0.0,), std=(1.0,), depth=10, width=1,
        experts=len(signs), topk=topk,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
        model.trunk.stem.weight[0, 0, 1, 1] = 1.0
        model.trunk.group1[0].shortcut.weight[0, 0, 0, 0] = 1.0
        model.trunk.group2[0].shortcut.weight[0, 0, 0, 0] = 1.0
        model.embed.conv.weight[0, 0, 1, 1] = 1.0
        for e, sign in enumerate(signs):
            model.moe.router.weight[e, 0, 0, 0] = sign
    return model.eval()


def patch_images(values: torch.Tensor) -> torch.Tensor:
    """``[N, 1, 16, 16]`` images made of constant patches with the given ``[N, 4, 4]`` values."""
    return values.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)[:, None].float()


def ranked_values(n: int, seed: int, low: float = 0.05, high: float = 0.45) -> torch.Tensor:
    """``[n, 4, 4]`` distinct patch values in [low, high], a random order per image."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.linspace(low, high, GRID * GRID)
    rows = [levels[torch.randperm(GRID * GRID, generator=gen)] for _ in range(n)]
    return torch.stack(rows).view(n, GRID, GRID)


def top_mask(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    idx = values.flatten(1).topk(k, dim=1, largest=largest).indices
    mask = torch.zeros(values.shape[0], GRID * GRID, dtype=torch.bool).scatter(1, idx, True)
    return mask.view(-1, GRID, GRID)


# -- the hand-set model routes as designed ---------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6))
def test_hand_set_router_keeps_brightest_and_darkest_patches(seed: int, k: int) -> None:
    values = ranked_values(3, seed)
    sel = selection_masks(transparent_pmoe([1.0, -1.0], k), patch_images(values))
    assert sel.shape == (3, 2, GRID, GRID)
    assert torch.equal(sel[:, 0], top_mask(values, k, largest=True))
    assert torch.equal(sel[:, 1], top_mask(values, k, largest=False))


# -- pure metrics ----------------------------------------------------------------------------------------


def test_patch_touch_mask_marks_the_patches_a_trigger_touches() -> None:
    shape = (1, SIZE, SIZE)
    small = patch_touch_mask(BadNets(size=2, position="top-left"), shape, (GRID, GRID))
    assert small.nonzero().tolist() == [[0, 0]]
    wide = patch_touch_mask(BadNets(size=5, position="top-left"), shape, (GRID, GRID))
    assert wide.nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    corner = patch_touch_mask(BadNets(size=2, position="bottom-right"), shape, (GRID, GRID))
    assert corner.nonzero().tolist() == [[3, 3]]
    assert patch_touch_mask(BadPatches(BadNets(size=1), (GRID, GRID)), shape, (GRID, GRID)).all()
    assert not patch_touch_mask(BadNets(size=2, intensity=0.0), shape, (GRID, GRID)).any()
    with pytest.raises(ValueError, match="does not divide"):
        patch_touch_mask(BadNets(), (1, 15, 15), (GRID, GRID))


masks = st.integers(0, 2**16 - 1).map(
    lambda bits: torch.tensor([(bits >> i) & 1 for i in range(16)], dtype=torch.bool).view(1, 1, 4, 4)
)


@settings(max_examples=60, deadline=None)
@given(a=masks, b=masks)
def test_jaccard_is_symmetric_bounded_and_one_on_identical_sets(a: torch.Tensor, b: torch.Tensor) -> None:
    ab, ba = selection_jaccard(a, b), selection_jaccard(b, a)
    assert torch.equal(ab, ba)
    assert 0.0 <= float(ab) <= 1.0
    assert float(selection_jaccard(a, a)) == 1.0
    inter, union = int((a & b).sum()), int((a | b).sum())
    assert float(ab) == pytest.approx(inter / union if union else 1.0)


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 50), min_size=4, max_size=4))
def test_load_cv_is_population_std_over_mean(counts: list[int]) -> None:
    arr = np.array(counts, dtype=float)
    expected = arr.std() / arr.mean() if arr.mean() > 0 else 0.0
    got = float(load_cv(torch.tensor(counts).view(1, 2, 2))[0])
    assert got == pytest.approx(expected)


def test_expert_overlap_one_for_identical_experts_zero_for_disjoint() -> None:
    top = torch.zeros(1, 1, GRID, GRID, dtype=torch.bool)
    top[..., 0, :] = True
    bottom = torch.zeros_like(top)
    bottom[..., 3, :] = True
    assert float(expert_overlap(torch.cat([top, top], 1))) == 1.0
    assert float(expert_overlap(torch.cat([top, bottom], 1))) == 0.0
    # three experts: pairs (top, top) = 1, (top, bottom) = 0 twice -> 1/3
    assert float(expert_overlap(torch.cat([top, top, bottom], 1))) == pytest.approx(1 / 3)


# -- routing_metrics on planted triggers ----------------------------------------------------------------


def planted_values(n: int, seed: int) -> torch.Tensor:
    """Distinct patch values where the top-left and bottom-right patches hold the two middle ranks, so
    they are never the brightest or the darkest patch."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.linspace(0.05, 0.45, GRID * GRID)
    others = torch.cat([levels[:7], levels[9:]])
    out = torch.stack([torch.cat([levels[7:8], others[torch.randperm(14, generator=gen)], levels[8:9]])
                       for _ in range(n)])
    return out.view(n, GRID, GRID)


def test_route_rate_is_one_for_a_trigger_the_router_picks_and_zero_for_one_it_ignores() -> None:
    model = transparent_pmoe([1.0, -1.0], topk=1)
    clean = patch_images(planted_values(12, 0))
    # A white top-left square raises patch (0, 0)'s routed pixel to 1: the bright expert keeps it.
    top_left = BadNets(size=2, position="top-left", value=1.0)
    got = routing_metrics(model, clean, top_left(clean), top_left, batch_size=5)
    assert got["route_n_images"] == 12 and got["route_touched_patches"] == 1
    assert got["route_rate_e0"] == 1.0 and got["route_rate_e1"] == 0.0 and got["route_rate_any"] == 1.0
    assert got["route_rate_clean_any"] == 0.0
    assert got["route_jaccard_e0"] == 0.0  # the bright expert moved from its old top patch to (0, 0)
    assert got["route_jaccard_e1"] == 1.0  # the dark expert did not move
    assert got["route_jaccard_mean"] == 0.5
    # A bottom-right square misses the routed pixel of patch (3, 3): routing is unchanged, never routed.
    bottom_right = BadNets(size=2, position="bottom-right", value=1.0)
    got = routing_metrics(model, clean, bottom_right(clean), bottom_right)
    assert got["route_rate_any"] == 0.0 and got["route_rate_e0"] == 0.0 and got["route_rate_e1"] == 0.0
    assert got["route_jaccard_mean"] == 1.0 and got["route_jaccard_e0"] == 1.0


def test_load_cv_reaches_its_maximum_when_an_expert_always_keeps_the_same_patches() -> None:
    k, n_patches = 2, GRID * GRID
    noise = torch.rand(6, GRID, GRID, generator=torch.Generator().manual_seed(1))
    values = 0.1 + 0.01 * noise
    values[:, 0, 0], values[:, 2, 3] = 0.9, 0.8  # always the two brightest
    got = routing_metrics(transparent_pmoe([1.0, 1.0], k), patch_images(values))
    assert got["load_cv_e0"] == pytest.approx(math.sqrt(n_patches / k - 1))
    assert got["load_cv_std"] == pytest.approx(0.0)
    assert got["route_expert_overlap"] == 1.0
    assert "route_rate_any" not in got and "route_jaccard_mean" not in got  # no trigger given


def test_metrics_do_not_depend_on_batch_size_and_keep_train_mode() -> None:
    model = transparent_pmoe([1.0, -1.0, 0.5], topk=3).train()
    clean = patch_images(ranked_values(11, 3))
    trigger = Blend(alpha=0.3)
    triggered = trigger(clean)
    whole = routing_metrics(model, clean, triggered, trigger, batch_size=512)
    assert model.training
    pieces = routing_metrics(model, clean, triggered, trigger, batch_size=4)
    assert whole.keys() == pieces.keys()
    assert all(whole[k] == pytest.approx(pieces[k]) for k in whole)
    assert json.loads(json.dumps(whole)) == whole  # flat and JSON-able


def test_tally_sums_batches_like_one_pass() -> None:
    sel = selection_masks(transparent_pmoe([1.0, -1.0], 2), patch_images(ranked_values(8, 4)))
    touch = torch.zeros(GRID, GRID, dtype=torch.bool)
    touch[1, 1] = True
    once, twice = RoutingTally(2, (GRID, GRID), touch), RoutingTally(2, (GRID, GRID), touch)
    once.update(sel, sel.flip(0))
    twice.update(sel[:3], sel.flip(0)[:3])
    twice.update(sel[3:], sel.flip(0)[3:])
    assert once.result() == pytest.approx(twice.result())
    with pytest.raises(ValueError, match="does not match"):
        once.update(sel[:, :1])


def test_tally_and_evaluation_pass_read_nothing_back_per_batch() -> None:
    """The evaluation loop (forward passes) and the tally's updates stay on the device: no host read per
    batch; the result reads the sums back once (one transfer, plus the touch mask's share)."""
    from bench.evaluate import forward_pass
    from bench.hostreads import host_reads

    model = transparent_pmoe([1.0, -1.0], 2)
    x = patch_images(ranked_values(8, 4))
    touch = torch.zeros(GRID, GRID, dtype=torch.bool)
    touch[1, 1] = True
    tally = RoutingTally(2, (GRID, GRID), touch)
    with host_reads() as calls:
        clean = forward_pass(model, x, batch_size=3)
        triggered = forward_pass(model, x.flip(0), batch_size=3)
        for begin in range(0, x.shape[0], 3):
            tally.update(clean.selection[begin : begin + 3], triggered.selection[begin : begin + 3])
    assert calls == []
    with host_reads() as calls:
        out = tally.result()
    assert calls.count("cpu") <= 2 and "item" not in calls
    assert out == pytest.approx(routing_metrics(model, x, x.flip(0), None, 3) | {
        k: v for k, v in out.items() if k.startswith(("route_rate", "route_touched", "route_trigger"))})


def test_dense_model_has_no_routing_metrics() -> None:
    dense = REGISTRY.get("model", "dense").create(
        input_shape=(1, SIZE, SIZE), num_classes=2, mean=(0.0,), std=(1.0,), width=1
    )
    x = torch.rand(2, 1, SIZE, SIZE)
    assert routing_metrics(dense, x, x, BadNets()) == {}
    with pytest.raises(NoRoutingError, match="no routing"):
        selection_masks(dense, x)


# -- map data and pictures -------------------------------------------------------------------------------


def test_map_data_follow_the_hand_set_routing() -> None:
    values = ranked_values(5, 7)
    values[:, 1, 2] = 0.9  # patch (1, 2) is always the brightest
    images = patch_images(values)
    sel = selection_masks(transparent_pmoe([1.0, -1.0], 1), images)
    freq = selection_frequency(sel)
    assert freq[0, 1, 2] == 1.0 and freq[0].sum() == pytest.approx(1.0)
    darkest = top_mask(values, 1, largest=False).float().mean(0)
    assert torch.allclose(freq[1], darkest)
    kept = expert_patch_values(images, sel)
    assert torch.allclose(kept[0], torch.full((5,), 0.9))
    assert torch.allclose(kept[1], values.flatten(1).min(dim=1).values)
    assert torch.allclose(patch_means(images, (GRID, GRID)), values)
    shares = value_shares(kept[0])
    assert shares.shape == (HIST_BINS,) and shares[int(0.9 * HIST_BINS)] == 1.0 and shares.sum() == 1.0
    # highlight: kept patch as it is, every other patch faded toward the fade colour
    pic = highlight(images[0], sel[0, 0])
    assert pic.shape == (SIZE, SIZE, 3)
    assert np.allclose(pic[4:8, 8:12], 0.9)
    expected_faded = (1 - FADE) * values[0, 0, 0].item() + FADE * np.asarray(FADE_COLOR)
    assert np.allclose(pic[0:4, 0:4], expected_faded)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
        assert pixels.std() > 5  # not a blank canvas
        return img.size


def test_pictures_are_real_pngs_whose_layout_follows_the_inputs(tmp_path: Path) -> None:
    model = transparent_pmoe([1.0, -1.0], 3)
    clean = patch_images(ranked_values(2, 5))
    trigger = BadNets(size=3, position="top-left", value=1.0)
    triggered = trigger(clean)
    sels = {"a": selection_masks(model, clean), "b": selection_masks(model, clean)}
    trig = {k: selection_masks(model, triggered) for k in sels}
    touch = patch_touch_mask(trigger, (1, SIZE, SIZE), (GRID, GRID))
    both = draw_selection_maps(clean, sels, tmp_path / "both.png", triggered, trig, touch, "title")
    one = draw_selection_maps(clean, sels, tmp_path / "sub" / "one.png")
    (w_both, h_both), (w_one, h_one) = png_size(both), png_size(one)
    assert w_both > 1.8 * w_one  # clean and triggered blocks side by side
    assert abs(h_both - h_one) < 0.25 * h_one  # same rows: 2 images x 2 models
    freq = draw_frequency_maps({"a, clean": selection_frequency(sels["a"]),
                                "a, triggered": selection_frequency(trig["a"])}, tmp_path / "f.png", touch)
    every = patch_means(clean, (GRID, GRID)).flatten()
    hist = draw_patch_values({"a": (expert_patch_values(clean, sels["a"]), every)}, tmp_path / "h.png")
    png_size(freq), png_size(hist)
    assert both.read_bytes() != one.read_bytes()


# -- cells -> groups -------------------------------------------------------------------------------------


def cell(attack: dict | None, rate: float | None, eval_job: str, train_job: str, *, quant: str = "fp32",
         defense: dict | None = None, seed: int = 0) -> dict:
    return {
        "dataset": {"name": "digits"}, "model": {"name": "pmoe"}, "train": {"epochs": 1}, "seed": seed,
        "attack": attack, "poison_rate": rate, "train_job": train_job, "eval_job": eval_job,
        "clean_eval_job": "ev-clean", "quant": {"label": quant}, "defense": defense,
    }


def test_groups_gather_clean_backdoored_and_defended_models_at_full_precision() -> None:
    bad = {"name": "badnets", "apply": "image", "target": 0, "params": {}}
    fp = {"name": "fine-pruning", "epochs": 5}
    cells = [
        cell(None, None, "ev-clean", "tr-clean"),
        cell(bad, 0.1, "ev-bad", "tr-bad"),
        cell(bad, 0.1, "ev-bad-q8", "tr-bad", quant="8-bit"),
        cell(bad, 0.1, "ev-fp1", "tr-bad", defense={**fp, "rate": 0.1, "stage": "pruned"}),
        cell(bad, 0.1, "ev-fp2", "tr-bad", defense={**fp, "rate": 0.2, "stage": "pruned"}),
        cell(bad, 0.2, "ev-bad2", "tr-bad2"),
    ]
    groups = select_groups(cells, rate=0.1)
    assert len(groups) == 1
    labels = [(m.label, m.eval_job, m.train_job) for m in groups[0].models]
    assert labels == [
        ("clean", "ev-clean", "tr-clean"), ("backdoored", "ev-bad", "tr-bad"),
        ("fine-pruning pruned [rate=0.1]", "ev-fp1", None),
        ("fine-pruning pruned [rate=0.2]", "ev-fp2", None),
    ]
    assert groups[0].stem == "digits-pmoe-badnets-image-r0.1-s0"
    assert len(select_groups(cells)) == 2
    with pytest.raises(Exception, match=r"--attack: .*'wanet'.*badnets"):
        select_groups(cells, attack="wanet")
    with pytest.raises(Exception, match=r"--seed: .*3.*\b0\b"):
        select_groups(cells, seed=3)
    clean_only = select_groups([cells[0]])
    assert [m.label for m in clean_only[0].models] == ["clean"] and clean_only[0].attack is None


# -- bench analyze end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import yaml

    from bench import runner
    from tests.conftest import tiny_scenario

    root = tmp_path_factory.mktemp("analyze")
    scenario = root / "tiny.yaml"
    scenario.write_text(yaml.safe_dump(tiny_scenario(name="tiny-analyze")))
    runner.run(scenario, root / "runs", root / "reports")
    return root / "runs" / "tiny-analyze"


cli = CliRunner()


def test_analyze_writes_pictures_and_metrics_of_clean_and_backdoored(tiny_run: Path) -> None:
    # mounted the way the lead's CLI does it; default --out is RUN_DIR/analysis
    main = typer.Typer()
    main.command("analyze")(analyze)
    main.command("other")(lambda: None)
    args = ["--images", "2", "--test-images", "120", "--seed", "0", "--attack", "badnets", "--rate", "0.1"]
    result = cli.invoke(main, ["analyze", str(tiny_run), *args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    files = [Path(line) for line in result.stdout.splitlines()]
    assert files == [
        tiny_run / "analysis" / f"digits-pmoe-badnets-image-r0.1-s0-{kind}"
        for kind in ("selection.png", "frequency.png", "patch-values.png", "metrics.json")
    ]
    for png in files[:3]:
        png_size(png)
    metrics = json.loads(files[3].read_text())["models"]
    assert set(metrics) == {"clean", "backdoored"}
    for values in metrics.values():
        assert 0.0 <= values["route_rate_any"] <= 1.0 and values["route_touched_patches"] == 1.0
        assert {"route_rate_e0", "route_rate_e1", "route_jaccard_mean", "load_cv_mean"} <= set(values)
        assert 0 < values["route_n_images"] <= 120  # the seeded subset, less its target-class images
    assert "asr" in metrics["backdoored"] and "ba" in metrics["clean"]
    assert "backdoored" in result.stderr and "routed" in result.stderr
    # the report links the pictures, relative to its own folder
    from bench import runner

    report = runner.write_report(Store(tiny_run), tiny_run.parent / "report" / "tiny.md").read_text()
    section = report[report.index("## Routing pictures"):]
    for png in files[:3]:
        link = os.path.relpath(png, tiny_run.parent / "report")
        assert f"[{png.name}]({link})" in section


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attack", "wanet"], "--attack: no stored model matches 'wanet'"),
        (["--rate", "0.5"], "--rate: no stored model matches 0.5"),
        (["--images", "0"], "--images: must be at least 1"),
    ],
)
def test_analyze_user_mistakes_exit_2(tiny_run: Path, args: list[str], message: str) -> None:
    result = cli.invoke(app, ["analyze", str(tiny_run), *args])
    assert result.exit_code == 2
    assert message in result.stderr


def test_analyze_missing_run_and_dense_model_exit_2(tmp_path: Path) -> None:
    missing = cli.invoke(app, ["analyze", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no results store" in missing.stderr
    # a store holding one dense model, written by hand
    store = Store(tmp_path / "dense-run")
    spec = {"name": "dense", "width": 1}
    dense = REGISTRY.get("model", "dense").create(input_shape=(1, SIZE, SIZE), num_classes=10,
                                                  mean=(0.0,), std=(1.0,), width=1)
    artifact = store.save_state("tr-dense", dense.state_dict())
    store.record("tr-dense", "train", {}, [], {}, 0.0, "cpu", artifact)
    attack = {"name": "badnets", "apply": "image", "target": 0, "params": {"size": 2}}
    store.set_meta("cells", [
        {"dataset": {"name": "digits", "image_size": SIZE}, "model": spec, "train": {}, "seed": 0,
         "attack": attack, "poison_rate": 0.1, "train_job": "tr-dense", "eval_job": "ev-dense",
         "clean_eval_job": "ev-clean", "quant": None, "defense": None},
    ])
    result = cli.invoke(app, ["analyze", str(tmp_path / "dense-run"), "--device", "cpu"])
    assert result.exit_code == 2
    assert "has no routing" in result.stderr and "pmoe" in result.stderr
