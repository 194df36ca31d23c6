"""The SIG (``sinusoid``), Bpp and low-frequency triggers: each one's defining formula on hand-computed
cases, the paper defaults they register with, the trigger contract under ``apply: image`` and
``badpatches``, the plan-time checks, and their toy (``--smoke``) plan."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from bench.attacks import SIG, BadPatches, Bpp, LowFrequency, build_attack_trigger, trigger_problem
from bench.cli import app
from bench.errors import ComponentParamsError
from bench.plan import build
from bench.registry import get
from bench.scenario import resolve
from bench.smoke import smoke_plan, smoke_scenario
from tests.conftest import tiny_scenario

NEW = ("sinusoid", "bpp", "lowfreq")


def images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


# --- registry, defaults, parameters ----------------------------------------------------------------------


def test_registered_with_the_papers_defaults_and_listed_by_bench_plugins() -> None:
    expected = {
        "sinusoid": {"delta": 20 / 255, "frequency": 6.0},
        "bpp": {"squeeze_bits": 5, "dithering": True},
        "lowfreq": {"epsilon": 0.2, "cutoff": 4, "seed": 0},
    }
    for name, params in expected.items():
        assert get("trigger", name).validate({}) == params
    listed = CliRunner().invoke(app, ["plugins", "--kind", "trigger", "--json"])
    assert listed.exit_code == 0, listed.output
    builtins = {c["name"]: c for c in json.loads(listed.stdout) if c["source"] == "built-in"}
    assert set(NEW) <= set(builtins)
    assert {p["name"]: p["default"] for p in builtins["bpp"]["parameters"]} == expected["bpp"]


@pytest.mark.parametrize(("name", "params", "match"), [
    ("sinusoid", {"delta": 1.5}, r"sinusoid\.delta: must be in \[0, 1\]"),
    ("sinusoid", {"frequency": 0}, r"sinusoid\.frequency: must be > 0"),
    ("bpp", {"squeeze_bits": 0}, r"bpp\.squeeze_bits: must be in 1\.\.8"),
    ("bpp", {"squeeze_bits": 9}, r"bpp\.squeeze_bits: must be in 1\.\.8"),
    ("lowfreq", {"epsilon": -0.1}, r"lowfreq\.epsilon: must be in \[0, 1\]"),
    ("lowfreq", {"cutoff": 1}, r"lowfreq\.cutoff: must be >= 2"),
    ("bpp", {"bits": 3}, r"unknown parameter of trigger 'bpp'"),
])
def test_bad_parameters_name_the_field_and_the_range(name: str, params: dict, match: str) -> None:
    with pytest.raises(ComponentParamsError, match=match):
        get("trigger", name).create(**params)


# --- SIG -----------------------------------------------------------------------------------------------------


def test_sig_adds_the_horizontal_sinusoid_on_every_row_and_channel() -> None:
    x = torch.full((2, 3, 5, 24), 0.5)
    out = SIG()(x)  # 6 periods over 24 columns: sin(pi j / 2) = 0, 1, 0, -1, ...
    wave = torch.tensor([0.0, 1.0, 0.0, -1.0] * 6) * 20 / 255
    assert torch.allclose(out, (0.5 + wave).expand_as(x), atol=1e-7)
    assert torch.equal(SIG().touched_mask((3, 5, 24))[0], wave != 0)
    bright = SIG(delta=0.3, frequency=6)(torch.full((1, 1, 1, 24), 0.9))
    assert bright.max() == 1.0 and bright.min() == pytest.approx(0.6)  # clipped to [0, 1]


def test_sig_refuses_a_frequency_that_samples_only_zeros() -> None:
    with pytest.raises(ComponentParamsError, match="samples the sine only at its zeros"):
        SIG(frequency=6)(torch.rand(1, 1, 4, 4))  # sin(2 pi j 6 / 4) = sin(3 pi j) = 0
    assert torch.equal(SIG(delta=0.0, frequency=6)(torch.full((1, 1, 4, 4), 0.5)), torch.full((1, 1, 4, 4), 0.5))


# --- Bpp ---------------------------------------------------------------------------------------------------


def floyd_steinberg(image: list[list[float]], levels: int) -> list[list[float]]:
    """The textbook algorithm, one pixel at a time (the authors' ``floydDitherspeed`` in [0, 1])."""
    img = [row[:] for row in image]
    h, w = len(img), len(img[0])
    for y in range(h):
        for x in range(w):
            old = img[y][x]
            new = min(max(round(old * (levels - 1)), 0), levels - 1) / (levels - 1)
            img[y][x], err = new, old - new
            for dy, dx, share in ((0, 1, 7), (1, -1, 3), (1, 0, 5), (1, 1, 1)):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    img[y + dy][x + dx] += err * share / 16
    return img


def test_bpp_dithering_by_hand_and_against_the_textbook_algorithm() -> None:
    flat = torch.full((1, 1, 2, 3), 0.4)
    # row 0: 0.4 -> 0 (error 0.4); 0.4 + 7/16 * 0.4 = 0.575 -> 1 (error -0.425); 0.4 - 0.186 = 0.214 -> 0
    # row 1 starts at 0.445, 0.332, 0.440 (5/16 below, 1/16 below-right, 3/16 below-left of row 0's errors):
    # 0.445 -> 0 (error 0.445); 0.332 + 0.195 = 0.527 -> 1 (error -0.473); 0.440 - 0.207 = 0.233 -> 0
    assert Bpp(squeeze_bits=1)(flat)[0, 0].tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    assert Bpp(squeeze_bits=1, dithering=False)(flat).eq(0).all()  # plain rounding loses the grey
    x = images(3, 2, 5, 7, seed=4)
    for bits in (1, 3, 5):
        out = Bpp(squeeze_bits=bits)(x)
        for n in range(3):
            for c in range(2):
                want = torch.tensor(floyd_steinberg(x[n, c].double().tolist(), 2**bits), dtype=torch.float32)
                assert torch.allclose(out[n, c], want, atol=1e-6)


def test_bpp_output_is_on_the_level_grid_and_keeps_the_local_mean() -> None:
    x = images(2, 3, 16, 16, seed=1)
    for bits in (2, 5):
        top = 2**bits - 1
        out = Bpp(squeeze_bits=bits)(x)
        assert torch.allclose(out * top, torch.round(out * top), atol=1e-5)
        assert torch.equal(Bpp(squeeze_bits=bits, dithering=False)(x), torch.round(x * top) / top)
    grey = torch.full((1, 1, 32, 32), 0.3)
    assert Bpp(squeeze_bits=1)(grey).mean().item() == pytest.approx(0.3, abs=0.02)  # dithering keeps the grey
    on_grid = torch.randint(0, 256, (2, 1, 8, 8)).float() / 255
    assert torch.equal(Bpp(squeeze_bits=8)(on_grid), on_grid)  # 8 bits changes nothing on 8-bit images


def test_bpp_leaves_its_input_alone() -> None:
    x = images(1, 1, 6, 6).double()
    before = x.clone()
    Bpp(squeeze_bits=2)(x)
    assert torch.equal(x, before)


# --- low frequency -------------------------------------------------------------------------------------------


def dct_matrix(size: int) -> torch.Tensor:
    """Orthonormal DCT-II ``[size, size]``."""
    k = torch.arange(size, dtype=torch.float64)[:, None]
    i = torch.arange(size, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * size)) * math.sqrt(2 / size)
    m[0] /= math.sqrt(2)
    return m


def test_lowfreq_pattern_has_no_frequency_above_the_cutoff_and_spans_zero_to_epsilon() -> None:
    trigger = LowFrequency(epsilon=0.2, cutoff=4, seed=3)
    t = trigger.pattern(3, 32, 32, dtype=torch.float64)
    assert t.min().item() == pytest.approx(0.0, abs=1e-12) and t.max().item() == pytest.approx(0.2)
    d = dct_matrix(32)
    spectrum = torch.einsum("ui,cij,vj->cuv", d, t, d)
    spectrum[:, :4, :4] = 0
    assert spectrum.abs().max() < 1e-9  # nothing outside the 4x4 lowest frequencies
    x = images(2, 3, 32, 32)
    assert torch.allclose(trigger(x), (x + t.float()).clamp(0, 1))


def test_lowfreq_is_the_same_smooth_picture_at_every_size_and_fixed_by_its_seed() -> None:
    big = LowFrequency(seed=1).pattern(1, 64, 64)
    small = LowFrequency(seed=1).pattern(1, 16, 16)
    pooled = torch.nn.functional.avg_pool2d(big[None], 4)[0]
    assert (pooled - small).abs().max() < 0.02  # the same function sampled at two resolutions
    assert not torch.allclose(LowFrequency(seed=1).pattern(1, 16, 16), LowFrequency(seed=2).pattern(1, 16, 16))
    x = images(2, 1, 16, 16)
    assert torch.equal(LowFrequency(epsilon=0.0)(x), x)


# --- the contract, both applications, plan-time checks -----------------------------------------------------


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (2, 3, 32, 32), (1, 1, 28, 28)])
def test_shape_range_change_and_determinism(name: str, shape: tuple[int, int, int, int]) -> None:
    x = images(*shape)
    make = get("trigger", name).create
    out = make()(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)
    assert torch.equal(make()(x), out)
    patched = BadPatches(make(), (2, 2))(x)
    assert patched.shape == x.shape and not torch.equal(patched, out)  # every patch is its own image


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("apply", ["image", "badpatches"])
def test_plan_time_checks_pass_on_digits_mnist_and_cifar_shapes(name: str, apply: str) -> None:
    for shape, routing in (((1, 16, 16), (4, 4)), ((1, 28, 28), (7, 7)), ((3, 32, 32), (8, 8))):
        attack = {"name": name, "params": {}, "apply": apply}
        if apply == "badpatches":
            attack["trigger_grid"] = [2, 2]  # 8x8 .. 16x16 patches
        assert trigger_problem(attack, shape, routing) is None


def test_sig_on_four_pixel_routing_patches_is_refused_with_its_reason() -> None:
    problem = trigger_problem({"name": "sinusoid", "params": {}, "apply": "badpatches"}, (1, 16, 16), (4, 4))
    assert problem is not None and "4x4-pixel patches" in problem and "only at its zeros" in problem
    assert trigger_problem({"name": "sinusoid", "params": {"frequency": 1.0}, "apply": "badpatches"},
                           (1, 16, 16), (4, 4)) is None


@pytest.mark.parametrize("name", NEW)
def test_touched_mask_marks_what_the_trigger_changes(name: str) -> None:
    trigger = build_attack_trigger(name, {}, "image")
    mask = trigger.touched_mask((1, 16, 16))
    x = images(4, 1, 16, 16)
    changed = (trigger(x) != x).any(dim=(0, 1))
    assert not (changed & ~mask).any()  # nothing changes outside the mask
    assert mask.float().mean() > 0.4


def test_smoke_plans_every_new_trigger_and_mode() -> None:
    raw = tiny_scenario(attacks=[
        {"name": "sinusoid", "mode": "clean-label", "target": 0},
        {"name": "bpp", "mode": "all-to-all"},
        {"name": "lowfreq", "apply": "badpatches", "trigger_grid": 2, "target": 1},
    ], poison_rates=[0.05])
    plan = smoke_plan(build(resolve(smoke_scenario(raw))))
    attacked = [c.attack for c in plan.cells if c.attack and not c.not_applicable]
    assert {(a["name"], a.get("mode", "dirty")) for a in attacked} == {
        ("sinusoid", "clean-label"), ("bpp", "all-to-all"), ("lowfreq", "dirty")}
