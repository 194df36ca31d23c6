"""Triggers: each one's defining formula on hand-computed cases, plus the contract every trigger keeps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.attacks import BadNets, BadPatches, Blend, WaNet, build_attack_trigger
from bench.attacks.base import Trigger
from bench.errors import ComponentParamsError, UnknownComponentError
from bench.registry import get

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
        "wanet": {"k": 4, "s": 0.5, "seed": 0, "grid_rescale": 1.0, "noise_mode": False, "cross_ratio": 2.0},
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
