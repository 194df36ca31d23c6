"""Triggers: each one's defining formula on hand-computed cases, the contract every trigger keeps, the
BadPatches trigger grid, and the plan-time check for triggers that cannot run or are degenerate."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.attacks import BadNets, BadPatches, Blend, WaNet, build_attack_trigger, normalize_grid, trigger_problem
from bench.attacks.base import Trigger
from bench.attacks.checks import output_problem
from bench.errors import ComponentParamsError, UnknownComponentError
from bench.registry import REGISTRY, get, register_trigger

FAST = settings(max_examples=25, deadline=None)


def images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def defaults() -> dict[str, Trigger]:
    return {"badnets": BadNets(), "blend": Blend(), "wanet": WaNet()}


# --- registry and schema -------------------------------------------------------------------------------


def test_registered_with_the_briefed_defaults() -> None:
    expected = {
        "badnets": {"size": 3, "position": "bottom-right", "value": 1.0, "intensity": 1.0, "margin": 0},
        "blend": {"alpha": 0.5, "pattern": "noise", "seed": 0},
        "wanet": {"k": 4, "s": 0.5, "seed": 0, "grid_rescale": 1.0, "noise_mode": False, "cross_ratio": 2.0,
                  "sampling": "bilinear"},
    }
    for name, params in expected.items():
        comp = get("trigger", name)
        assert {p.name: p.default for p in comp.params} == params
        assert comp.validate({}) == params


def test_strength_param_names_a_constructor_parameter() -> None:
    for name, trigger in defaults().items():
        assert trigger.strength_param in {p.name for p in get("trigger", name).params}


def test_position_choices_are_listed_in_the_error() -> None:
    with pytest.raises(ComponentParamsError, match="top-left.*center"):
        get("trigger", "badnets").create(position="left")


# --- the common contract -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["badnets", "blend", "wanet"])
@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 3, 32, 32), (1, 3, 5, 7), (3, 1, 4, 4)])
def test_shape_range_and_change(name: str, shape: tuple[int, int, int, int]) -> None:
    x = images(*shape)
    out = defaults()[name](x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    assert torch.equal(defaults()[name](x), out)  # deterministic across fresh instances


@FAST
@given(
    name=st.sampled_from(["badnets", "blend", "wanet"]),
    c=st.sampled_from([1, 3]),
    h=st.integers(3, 20),
    w=st.integers(3, 20),
    seed=st.integers(0, 2**16),
)
def test_strength_zero_is_the_identity(name: str, c: int, h: int, w: int, seed: int) -> None:
    trigger = get("trigger", name).create(**{get("trigger", name).factory.strength_param: 0.0})
    x = images(2, c, h, w, seed)
    assert torch.equal(trigger(x), x)
    assert torch.equal(BadPatches(trigger, (1, 1))(x), x)


@pytest.mark.parametrize("cls", [Blend, WaNet])
def test_seed_fixes_the_trigger(cls: type[Trigger]) -> None:
    x = images(2, 3, 16, 16)
    assert torch.equal(cls(seed=3)(x), cls(seed=3)(x))
    assert not torch.allclose(cls(seed=3)(x), cls(seed=4)(x))


# --- BadNets -------------------------------------------------------------------------------------------

BOXES = {  # on a 6x5 image, size 2, margin 1: (rows, cols) hand-computed
    "top-left": ((1, 3), (1, 3)),
    "top-right": ((1, 3), (2, 4)),
    "bottom-left": ((3, 5), (1, 3)),
    "bottom-right": ((3, 5), (2, 4)),
    "center": ((2, 4), (1, 3)),
}


@pytest.mark.parametrize("position", list(BOXES))
def test_badnets_exact_pixels(position: str) -> None:
    x = torch.full((2, 3, 6, 5), 0.25)
    out = BadNets(size=2, position=position, value=1.0, intensity=0.5, margin=1)(x)  # type: ignore[arg-type]
    (r0, r1), (c0, c1) = BOXES[position]
    expected = x.clone()
    expected[..., r0:r1, c0:c1] = 0.625  # 0.5 * 0.25 + 0.5 * 1.0
    assert torch.equal(out, expected)
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[r0:r1, c0:c1] = True
    assert torch.equal(BadNets(size=2, position=position, margin=1).touched_mask((3, 6, 5)), mask)  # type: ignore[arg-type]


def test_badnets_black_square_full_intensity() -> None:
    x = images(1, 1, 4, 4)
    out = BadNets(size=4, value=0.0)(x)
    assert torch.equal(out, torch.zeros_like(x))


def test_badnets_too_large_names_size_and_image() -> None:
    with pytest.raises(ComponentParamsError, match=r"size.*5x5.*4x4"):
        BadNets(size=5)(images(1, 3, 4, 4))
    with pytest.raises(ComponentParamsError, match="margin"):
        BadNets(size=3, margin=2)(images(1, 3, 4, 4))


@pytest.mark.parametrize(
    "params", [{"size": 0}, {"value": 1.5}, {"intensity": -0.1}, {"margin": -1}]
)
def test_badnets_rejects_bad_values(params: dict[str, float]) -> None:
    with pytest.raises(ComponentParamsError, match=next(iter(params))):
        BadNets(**params)  # type: ignore[arg-type]


# --- Blend ---------------------------------------------------------------------------------------------


def write_png(path, array: torch.Tensor) -> str:  # array [H, W, 3] uint8
    Image.fromarray(array.numpy(), mode="RGB").save(path)
    return str(path)


def test_blend_exact_formula_with_a_known_pattern(tmp_path) -> None:
    pixels = torch.randint(0, 256, (4, 4, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    path = write_png(tmp_path / "t.png", pixels)
    t = pixels.permute(2, 0, 1).float() / 255
    x = images(2, 3, 4, 4)
    out = Blend(alpha=0.3, pattern=path)(x)
    torch.testing.assert_close(out, 0.7 * x + 0.3 * t, rtol=0, atol=1e-6)


def test_blend_file_pattern_gray_and_resized(tmp_path) -> None:
    path = write_png(tmp_path / "c.png", torch.full((10, 6, 3), 51, dtype=torch.uint8))  # 51 / 255 = 0.2
    x = images(2, 1, 7, 3)  # grayscale data, other size: a constant pattern stays 0.2 everywhere
    out = Blend(alpha=0.5, pattern=path)(x)
    torch.testing.assert_close(out, 0.5 * x + 0.5 * 0.2, rtol=0, atol=1e-6)


def test_blend_noise_pattern_is_seeded_uniform_noise() -> None:
    blend = Blend(seed=7)
    base = blend.pattern_for(3, 32, 32)
    assert torch.equal(base, torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(7)))
    small = blend.pattern_for(3, 8, 8)  # the same pattern: every pixel is one of the base's pixels
    assert torch.isin(small, base).all()
    assert small.std() > 0.2  # still full-contrast noise (uniform noise has std 0.29)


def test_blend_missing_or_unreadable_file_names_the_path(tmp_path) -> None:
    with pytest.raises(ComponentParamsError, match="nothere.png"):
        Blend(pattern=str(tmp_path / "nothere.png"))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ComponentParamsError, match="bad.png"):
        Blend(pattern=str(bad))


def test_blend_file_pattern_needs_one_or_three_channels(tmp_path) -> None:
    path = write_png(tmp_path / "t.png", torch.zeros(4, 4, 3, dtype=torch.uint8))
    with pytest.raises(ComponentParamsError, match="channels"):
        Blend(pattern=path)(images(1, 2, 4, 4))


def test_blend_alpha_out_of_range() -> None:
    with pytest.raises(ComponentParamsError, match="alpha"):
        Blend(alpha=1.5)


# --- WaNet ---------------------------------------------------------------------------------------------


def bilinear_by_hand(img: torch.Tensor, gx: float, gy: float) -> float:
    """grid_sample(align_corners=True, zeros padding) at one normalised point of a [H, W] image."""
    h, w = img.shape
    px, py = (gx + 1) / 2 * (w - 1), (gy + 1) / 2 * (h - 1)
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    total = 0.0
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * float(img[yy, xx])
    return total


def test_wanet_k1_is_a_constant_shift_computed_by_hand() -> None:
    h, w, s = 5, 6, 1.7
    trigger = WaNet(k=1, s=s, seed=2)
    dx, dy = float(trigger.field[0, 0, 0, 0]), float(trigger.field[0, 1, 0, 0])
    assert abs(dx) + abs(dy) == pytest.approx(2.0)  # normalised by the mean magnitude
    x = images(1, 1, h, w)
    out = trigger(x)[0, 0]
    for i in range(h):
        for j in range(w):
            gx = min(1.0, max(-1.0, -1 + 2 * j / (w - 1) + s * dx / h))
            gy = min(1.0, max(-1.0, -1 + 2 * i / (h - 1) + s * dy / h))
            assert float(out[i, j]) == pytest.approx(bilinear_by_hand(x[0, 0], gx, gy), abs=1e-5)


def test_wanet_grid_follows_the_formula_at_the_control_points() -> None:
    # align_corners=True upsampling keeps the corner control points, so the corners of the grid are
    # clamp((identity + s * field / H) * grid_rescale) exactly.
    h, s, r = 12, 0.8, 0.95
    trigger = WaNet(k=4, s=s, seed=5, grid_rescale=r)
    grid, field = trigger.grid(h, h)[0], trigger.field[0]
    assert field.abs().mean() == pytest.approx(1.0)
    for (i, j), (fi, fj), (ix, iy) in [
        ((0, 0), (0, 0), (-1, -1)), ((0, h - 1), (0, 3), (1, -1)),
        ((h - 1, 0), (3, 0), (-1, 1)), ((h - 1, h - 1), (3, 3), (1, 1)),
    ]:
        ex = max(-1.0, min(1.0, (ix + s * float(field[0, fi, fj]) / h) * r))
        ey = max(-1.0, min(1.0, (iy + s * float(field[1, fi, fj]) / h) * r))
        assert grid[i, j].tolist() == pytest.approx([ex, ey], abs=1e-6)


def test_wanet_is_subtle_and_touches_the_image() -> None:
    x = images(4, 3, 32, 32)
    out = WaNet()(x)
    assert 0 < (out - x).abs().mean() < 0.15
    assert WaNet().touched_mask((3, 32, 32)).float().mean() > 0.9
    assert not WaNet(s=0).touched_mask((3, 32, 32)).any()


def test_wanet_noise_mode_cross_samples() -> None:
    trigger = WaNet(noise_mode=True)
    x = images(3, 3, 16, 16)
    a = trigger.noise(x, torch.Generator().manual_seed(0))
    b = trigger.noise(x, torch.Generator().manual_seed(0))
    c = trigger.noise(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, trigger(x))


def unique_image(c: int, h: int, w: int) -> torch.Tensor:
    """``[1, C, H, W]`` with every value distinct, so a copied pixel says where it came from."""
    return (torch.arange(c * h * w, dtype=torch.float32) / (c * h * w)).view(1, c, h, w)


def test_wanet_nearest_truncate_k1_computed_by_hand() -> None:
    # k = 1: one offset for the whole image; truncation copies pixel trunc((g + 1) / 2 * (size - 1)).
    h, w, s = 6, 7, 0.9
    trigger = WaNet(k=1, s=s, seed=2, sampling="nearest-truncate")
    dx, dy = float(trigger.field[0, 0, 0, 0]), float(trigger.field[0, 1, 0, 0])
    x = unique_image(2, h, w)
    out = trigger(x)[0]
    for i in range(h):
        for j in range(w):
            gx = min(1.0, max(-1.0, -1 + 2 * j / (w - 1) + s * dx / h))
            gy = min(1.0, max(-1.0, -1 + 2 * i / (h - 1) + s * dy / h))
            row, col = int((gy + 1) / 2 * (h - 1)), int((gx + 1) / 2 * (w - 1))
            assert torch.equal(out[:, i, j], x[0, :, row, col])


def test_wanet_nearest_truncate_is_the_notebooks_one_pixel_shift() -> None:
    # BadPatches notebooks' warp (k = 2, s = 0.25): each pixel is kept or replaced by its neighbour one
    # pixel up / left, by the sign of the field there; nothing is interpolated.
    h = w = 32
    trigger = WaNet(k=2, s=0.25, sampling="nearest-truncate")
    x = unique_image(3, h, w)
    out = trigger(x)
    source = {float(v): divmod(k % (h * w), w) for k, v in enumerate(x.flatten())}
    shifts = set()
    for i in range(h):
        for j in range(w):
            row, col = source[float(out[0, 0, i, j])]
            shifts.add((row - i, col - j))
            assert torch.equal(out[0, :, i, j], x[0, :, row, col])  # all channels from the same pixel
    assert shifts <= {(0, 0), (-1, 0), (0, -1), (-1, -1)}
    assert {(-1, 0), (0, -1)} & shifts and (0, 0) in shifts  # both kept and moved pixels
    changed = (out != x).any(dim=1)[0]
    assert torch.equal(trigger.touched_mask((3, h, w)), changed)
    assert not torch.equal(out, WaNet(k=2, s=0.25)(x))  # bilinear (WaNet's own) differs


def test_wanet_nearest_truncate_noise_mode_copies_pixels() -> None:
    trigger = WaNet(k=2, s=0.25, sampling="nearest-truncate", noise_mode=True)
    x = unique_image(1, 16, 16).expand(3, 1, 16, 16).contiguous()
    a = trigger.noise(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, trigger.noise(x, torch.Generator().manual_seed(0)))
    assert torch.isin(a, x).all()  # copied pixels, no interpolation
    assert not torch.equal(a[0], a[1])  # per-sample jitter


def test_wanet_sampling_choices() -> None:
    with pytest.raises(ComponentParamsError, match="bilinear.*nearest-truncate"):
        get("trigger", "wanet").create(sampling="cubic")


def test_wanet_rejects_bad_values() -> None:
    for params in ({"k": 0}, {"s": -1.0}, {"grid_rescale": 0.0}, {"cross_ratio": -1.0}):
        with pytest.raises(ComponentParamsError, match=next(iter(params))):
            WaNet(**params)  # type: ignore[arg-type]


# --- BadPatches ----------------------------------------------------------------------------------------


@FAST
@given(rows=st.integers(1, 4), cols=st.integers(1, 4), ph=st.integers(1, 5), pw=st.integers(1, 5))
def test_split_and_stitch_are_inverse(rows: int, cols: int, ph: int, pw: int) -> None:
    bp = BadPatches(BadNets(size=1), (rows, cols))
    x = images(2, 3, rows * ph, cols * pw)
    patches = bp.split(x)
    assert patches.shape == (2 * rows * cols, 3, ph, pw)
    for n in range(2):  # row-major order of patches within each image
        for r in range(rows):
            for c in range(cols):
                window = x[n, :, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw]
                assert torch.equal(patches[n * rows * cols + r * cols + c], window)
    assert torch.equal(bp.stitch(patches, 2), x)


@pytest.mark.parametrize("name", ["badnets", "blend", "wanet"])
def test_badpatches_touches_every_patch_like_the_inner_trigger(name: str) -> None:
    inner = defaults()[name]
    rows, cols, ph, pw = 2, 4, 8, 6
    x = images(2, 3, rows * ph, cols * pw)
    out = BadPatches(inner, (rows, cols))(x)
    assert out.shape == x.shape
    for r in range(rows):
        for c in range(cols):
            window = (..., slice(r * ph, (r + 1) * ph), slice(c * pw, (c + 1) * pw))
            assert not torch.equal(out[window], x[window])
            torch.testing.assert_close(out[window], inner(x[window].contiguous()), rtol=0, atol=1e-6)


def test_badpatches_strength_mask_and_divisibility() -> None:
    bp = BadPatches(BadNets(size=1, position="top-left"), (2, 2))
    assert bp.strength_param == "intensity"
    mask = bp.touched_mask((3, 4, 4))
    assert mask.nonzero().tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]]
    with pytest.raises(ComponentParamsError, match=r"5x4.*2x2"):
        bp(images(1, 3, 5, 4))


def test_build_attack_trigger() -> None:
    plain = build_attack_trigger("blend", {"alpha": 0.2}, "image", None)
    assert isinstance(plain, Blend) and plain.alpha == 0.2
    wrapped = build_attack_trigger("wanet", {"k": 2}, "badpatches", (4, 4))
    assert isinstance(wrapped, BadPatches) and wrapped.grid == (4, 4) and isinstance(wrapped.inner, WaNet)
    assert wrapped.inner.k == 2 and wrapped.strength_param == "s"
    with pytest.raises(ComponentParamsError, match="patch grid"):
        build_attack_trigger("badnets", {}, "badpatches", None)
    with pytest.raises(ComponentParamsError, match="apply"):
        build_attack_trigger("badnets", {}, "patches", (4, 4))
    with pytest.raises(ComponentParamsError, match="did you mean 'alpha'"):
        build_attack_trigger("blend", {"alhpa": 0.1}, "image", None)
    with pytest.raises(UnknownComponentError, match="badnets"):
        build_attack_trigger("badnet", {}, "image", None)


def test_build_attack_trigger_with_its_own_trigger_grid() -> None:
    assert build_attack_trigger("badnets", {}, "badpatches", (8, 8), 4).grid == (4, 4)
    assert build_attack_trigger("badnets", {}, "badpatches", (8, 8), [2, 4]).grid == (2, 4)
    assert build_attack_trigger("badnets", {}, "badpatches", (8, 8), None).grid == (8, 8)
    assert isinstance(build_attack_trigger("badnets", {}, "image", (8, 8), 4), BadNets)  # ignored
    assert build_attack_trigger("badnets", {}, "badpatches", None, 4).grid == (4, 4)  # fixed patches, dense
    with pytest.raises(ComponentParamsError, match="trigger_grid"):
        build_attack_trigger("badnets", {}, "badpatches", None, None)
    for bad in (0, [4, 0], [1, 2, 3], "4", True, [2.0, 2]):
        with pytest.raises(ComponentParamsError, match="trigger_grid"):
            build_attack_trigger("badnets", {}, "badpatches", (8, 8), bad)  # type: ignore[arg-type]
    assert normalize_grid([3]) == (3, 3) and normalize_grid((2, 5)) == (2, 5) and normalize_grid(None) is None


def test_paper_square_on_16_patches_of_8x8_blackens_a_quarter_of_every_patch() -> None:
    # BadPatches paper, Section 3.3.4: a 32x32 image split into 16 patches of 8x8, the 4x4 top-left square
    # stamped into each: the top-left quarter of every 8x8 patch is black, the rest untouched.
    x = images(2, 3, 32, 32)
    out = build_attack_trigger("badnets", {"size": 4, "position": "top-left", "value": 0.0}, "badpatches",
                               (8, 8), 4)(x)
    idx = torch.arange(32)
    quarter = ((idx[:, None] % 8) < 4) & ((idx[None, :] % 8) < 4)
    assert quarter.float().mean() == 0.25
    assert torch.equal(out[..., quarter], torch.zeros_like(out[..., quarter]))
    assert torch.equal(out[..., ~quarter], x[..., ~quarter])
    # on the pMoE's routing grid (64 patches of 4x4) the same square paints every pixel
    everything = build_attack_trigger("badnets", {"size": 4, "position": "top-left", "value": 0.0},
                                      "badpatches", (8, 8))(x)
    assert torch.equal(everything, torch.zeros_like(x))


# --- trigger_problem: attacks that cannot run or are degenerate ------------------------------------------

CIFAR = (3, 32, 32)
PAPER_GRID = (8, 8)
SQUARE = {"size": 4, "position": "top-left", "value": 0.0}


def attack(name: str, params: dict | None = None, apply: str = "image", trigger_grid=None) -> dict:
    return {"name": name, "params": get("trigger", name).validate(params or {}), "apply": apply,
            "target": 0, "trigger_grid": trigger_grid}


class Pixelate(Trigger):
    """Test trigger: every ``cell`` x ``cell`` block becomes its mean (flat blocks that follow the input)."""

    strength_param: ClassVar[str] = "cell"

    def __init__(self, cell: int = 4) -> None:
        self.cell = cell

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(images, self.cell)
        return F.interpolate(pooled, scale_factor=self.cell, mode="nearest")


class PatchMean(Trigger):
    """Test trigger: the whole image (under BadPatches: each patch) becomes its mean per channel."""

    strength_param: ClassVar[str] = "unused"

    def __init__(self, unused: float = 1.0) -> None:
        self.unused = unused

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()


class Broken(Trigger):
    """Test trigger that fails on small images, as a careless plugin might."""

    strength_param: ClassVar[str] = "unused"

    def __init__(self, unused: float = 1.0) -> None:
        self.unused = unused

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] < 16:
            raise IndexError("index 12 is out of bounds for dimension 3 with size 8")
        return images.flip(-1)


@pytest.fixture
def test_triggers() -> Iterator[None]:
    names = {"t-pixelate": Pixelate, "t-patch-mean": PatchMean, "t-broken": Broken}
    for name, cls in names.items():
        register_trigger(name)(cls)
    yield
    for name in names:
        REGISTRY.unregister("trigger", name)


@pytest.mark.parametrize(
    "the_attack, shape, grid",
    [
        (attack("badnets", SQUARE), CIFAR, PAPER_GRID),
        (attack("badnets", SQUARE, "badpatches", 4), CIFAR, PAPER_GRID),
        (attack("badnets", SQUARE, "badpatches", [2, 4]), CIFAR, PAPER_GRID),
        (attack("blend", {"alpha": 0.5}, "badpatches"), CIFAR, PAPER_GRID),
        (attack("wanet", {"k": 2, "s": 0.25, "sampling": "nearest-truncate"}, "badpatches", 4), CIFAR, PAPER_GRID),
        (attack("wanet", {"k": 4, "s": 0.5}), (1, 28, 28), None),
        (attack("badnets", {"size": 2, "position": "bottom-right"}), (1, 16, 16), None),
        (attack("badnets", {"size": 2, "intensity": 0.0}, "badpatches"), (1, 16, 16), (4, 4)),  # control
        (attack("blend", {"alpha": 0.0}), CIFAR, None),  # strength 0: a search's no-backdoor control
    ],
)
def test_runnable_attacks_have_no_problem(the_attack: dict, shape: tuple, grid: tuple | None) -> None:
    assert trigger_problem(the_attack, shape, grid) is None


def test_badpatches_on_the_routing_grid_needs_a_routing_model() -> None:
    problem = trigger_problem(attack("badnets", SQUARE, "badpatches"), CIFAR, None)
    assert problem is not None and "routing grid" in problem and "trigger_grid" in problem
    assert trigger_problem(attack("badnets", SQUARE, "badpatches", 4), CIFAR, None) is None  # fixed patches
    assert trigger_problem(attack("badnets", SQUARE), CIFAR, None) is None


def test_trigger_grid_must_divide_the_image() -> None:
    problem = trigger_problem(attack("badnets", SQUARE, "badpatches", 3), CIFAR, PAPER_GRID)
    assert problem == "apply: badpatches: the 3x3 trigger grid does not divide a 32x32 image (32 % 3 = 2, 32 % 3 = 2)"
    problem = trigger_problem(attack("blend", {}, "badpatches"), (3, 30, 30), PAPER_GRID)  # routing grid
    assert problem is not None and "8x8 patch grid does not divide a 30x30" in problem
    assert "trigger_grid" in str(trigger_problem(attack("blend", {}, "badpatches", [0, 2]), CIFAR, PAPER_GRID))


def test_trigger_larger_than_the_image_or_the_patch() -> None:
    problem = trigger_problem(attack("badnets", {"size": 33}), CIFAR, PAPER_GRID)
    assert problem is not None and "33x33 square" in problem and "32x32" in problem and "\n" not in problem
    problem = trigger_problem(attack("badnets", {"size": 9}, "badpatches", 4), CIFAR, PAPER_GRID)
    assert problem is not None and "9x9 square" in problem and "8x8-pixel patches" in problem
    problem = trigger_problem(attack("badnets", {"size": 5}, "badpatches"), CIFAR, PAPER_GRID)
    assert problem is not None and "4x4-pixel patches" in problem


def test_square_filling_every_patch_of_the_routing_grid_is_degenerate() -> None:
    # the BadPatches paper's square on the pMoE's own grid: the whole image black
    problem = trigger_problem(attack("badnets", SQUARE, "badpatches"), CIFAR, PAPER_GRID)
    assert problem is not None and "flat colour" in problem and "trigger_grid" in problem
    problem = trigger_problem(attack("badnets", {"size": 8, "value": 0.3}, "badpatches", 4), CIFAR, PAPER_GRID)
    assert problem is not None and "flat colour" in problem
    problem = trigger_problem(attack("badnets", {"size": 32}), CIFAR, None)  # image-level, whole image
    assert problem is not None and "every image into one flat colour" in problem


def test_plugin_triggers_that_flatten_patches_or_fail(test_triggers: None) -> None:
    problem = trigger_problem(attack("t-pixelate"), CIFAR, PAPER_GRID)  # every 4x4 routing patch flat
    assert problem is not None and "routing patch" in problem and "4x4" in problem
    assert trigger_problem(attack("t-pixelate", {"cell": 2}), CIFAR, PAPER_GRID) is None
    problem = trigger_problem(attack("t-patch-mean", {}, "badpatches", 4), CIFAR, PAPER_GRID)
    assert problem is not None and "BadPatches patch" in problem and "8x8" in problem
    problem = trigger_problem(attack("t-broken", {}, "badpatches", 4), CIFAR, PAPER_GRID)
    assert problem is not None and "IndexError" in problem and "8x8-pixel patches" in problem
    assert trigger_problem(attack("t-broken"), CIFAR, PAPER_GRID) is None


def test_output_that_ignores_the_input_is_degenerate() -> None:
    problem = trigger_problem(attack("blend", {"alpha": 1.0}), CIFAR, PAPER_GRID)
    assert problem is not None and "no longer depends on its input" in problem
    problem = trigger_problem(attack("blend", {"alpha": 1.0}, "badpatches", 4), CIFAR, PAPER_GRID)
    assert problem is not None and "no longer depends on its input" in problem


class Misbehaving(Trigger):
    def __init__(self, out: str) -> None:
        self.out = out

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return images[..., 1:] if self.out == "crop" else images * 2


def test_output_must_keep_shape_and_range() -> None:
    assert "keep the shape" in str(output_problem(Misbehaving("crop"), CIFAR))
    assert "outside [0, 1]" in str(output_problem(Misbehaving("scale"), CIFAR))


def test_trigger_problem_is_fast() -> None:
    attacks = [attack("badnets", SQUARE, "badpatches", 4), attack("blend", {}, "badpatches", 4),
               attack("wanet", {"k": 2, "s": 0.25, "sampling": "nearest-truncate"}, "badpatches", 4)]
    trigger_problem(attacks[0], CIFAR, PAPER_GRID)  # imports and first-call set-up
    start = time.perf_counter()
    for _ in range(10):
        for a in attacks:
            assert trigger_problem(a, CIFAR, PAPER_GRID) is None
    assert (time.perf_counter() - start) / 30 < 0.05  # milliseconds in practice; loose for a busy machine
