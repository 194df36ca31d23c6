"""``bench new attack|defense|model|dataset NAME``: write a working plugin and its tests from a template.

Each template is a real component, not a placeholder: an additive checkerboard trigger, a fine-tuning
defense, a tiny patch-level MoE model that returns its routing, and a data set built from scikit-learn's
digits with a transform. Each comes with a test file that checks the component's contract and defining
properties, so a new user starts from something that passes ``bench plugins --plugins FILE``, runs in a
scenario, and has tests to keep green while they make it their own.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

from bench.errors import PluginError

#: ``bench new`` kinds and the registry kind each writes ("attack" is a trigger).
KINDS: dict[str, str] = {"attack": "trigger", "trigger": "trigger", "defense": "defense", "model": "model",
                         "dataset": "dataset"}

#: Registered names: lower case, starting with a letter, then letters, digits, "_" or "-".
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")

#: Names the templates import; a generated class must not hide them.
RESERVED_CLASS_NAMES = frozenset({
    "BenchModel", "ClassVar", "ComponentParamsError", "Defense", "DefenseContext", "DefenseStage",
    "Normalize", "Routing", "TensorData", "Trigger",
})


@dataclass(frozen=True)
class Names:
    """Spellings of one new component: registry name, module (file) name, class name."""

    kind: str
    name: str
    module: str
    cls: str


def names_for(kind: str, name: str) -> Names:
    """Check ``kind`` and ``name`` and derive the module and class names; errors say what to do instead."""
    if kind not in KINDS:
        raise PluginError(f"bench new: KIND must be one of {', '.join(k for k in KINDS if k != 'trigger')}, "
                          f"got {kind!r}")
    if not NAME_PATTERN.match(name):
        raise PluginError(
            f"bench new: NAME must start with a lower-case letter and contain only a-z, 0-9, '_' and '-' "
            f"(at most 40 characters), got {name!r}; e.g. 'my_attack'"
        )
    module = name.replace("-", "_")
    if keyword.iskeyword(module) or module == "test" or module.startswith(("test_", "conftest")):
        raise PluginError(f"bench new: NAME {name!r} would be a Python keyword or a test file's name; "
                          "choose another")
    cls = "".join(part.capitalize() for part in re.split(r"[_-]+", name) if part)
    if cls in RESERVED_CLASS_NAMES:
        raise PluginError(f"bench new: NAME {name!r} would make a class {cls} that hides bench's own {cls}; "
                          "choose another")
    return Names(KINDS[kind], name, module, cls)


def _check_free(names: Names) -> None:
    from bench.registry import REGISTRY

    if names.name in REGISTRY.names(names.kind):
        source = REGISTRY.get(names.kind, names.name).source
        raise PluginError(f"bench new: {names.kind} {names.name!r} is already registered (by {source}); "
                          "choose another NAME")


def render(names: Names, directory: Path) -> dict[Path, str]:
    """The files to write, ``{path: text}``: the plugin and its test file."""
    plugin = directory / f"{names.module}.py"
    test = directory / f"test_{names.module}.py"
    values = {"name": names.name, "module": names.module, "cls": names.cls, "path": plugin.as_posix(),
              "test_path": test.as_posix()}
    return {
        plugin: Template(PLUGIN_TEMPLATES[names.kind]).substitute(values),
        test: Template(TEST_TEMPLATES[names.kind]).substitute(values),
    }


def new(kind: str, name: str, directory: Path = Path("plugins"), force: bool = False) -> list[Path]:
    """Write ``directory/NAME.py`` (a working component of ``kind``) and ``directory/test_NAME.py``.

    Refuses a bad or already registered NAME, and existing files unless ``force``; returns the paths
    written. Raises :class:`PluginError` (the CLI turns it into a message and exit code 2).
    """
    names = names_for(kind, name)
    _check_free(names)
    files = render(names, Path(directory))
    existing = [p for p in files if p.exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing)
        raise PluginError(f"bench new: {shown} already exists; pass --force to overwrite")
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for path, text in files.items():
            path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise PluginError(f"bench new: cannot write into {directory}: {exc}") from None
    return list(files)


# --- templates ------------------------------------------------------------------------------------------
# string.Template placeholders: $name (registered name), $module (file stem), $cls (class name), $path and
# $test_path (the files written). A literal dollar sign would be written $$.

_TRIGGER = r'''"""$name: a checkerboard added to the image (written by `bench new attack $name`).

Make it yours: say here which paper this attack comes from (title, authors, year, link) and which settings
reproduce it, then change ``apply``. Keep the contract of :class:`bench.attacks.base.Trigger`: images
``[N, C, H, W]`` in [0, 1] in, the same shape in [0, 1] out, deterministic, any ``H, W`` (``apply:
badpatches`` calls the trigger on every patch of the model's routing grid as if it were an image), and
``strength_param`` naming the parameter that scales the trigger (searches tune it).

Check it::

    bench plugins --plugins $path
    python -m pytest $test_path

Use it: list the file under a scenario's ``plugins:`` (a path relative to the scenario file), then::

    attacks: [{name: $name, amplitude: 0.1, target: 0}]
"""

from __future__ import annotations

from typing import ClassVar

import torch

from bench.attacks.base import Trigger
from bench.errors import ComponentParamsError
from bench.registry import register_trigger


@register_trigger("$name")
class $cls(Trigger):
    r"""Checkerboard trigger: ``x' = clip(x + amplitude * c, 0, 1)``, ``c`` a +1/-1 checkerboard.

    Arguments:
        amplitude (float): strength in [0, 1]; 0 leaves images unchanged. Default: 0.1.
        cell (int): side of one square of the checkerboard in pixels, >= 1. Default: 1.

    Shape:
        images: ``[N, C, H, W]`` in [0, 1], any ``H, W``.
        output: ``[N, C, H, W]`` in [0, 1].

    Examples::

        >>> trigger = $cls(amplitude=0.1)
        >>> poisoned = trigger(images)
    """

    strength_param: ClassVar[str] = "amplitude"

    def __init__(self, amplitude: float = 0.1, cell: int = 1) -> None:
        if not 0.0 <= amplitude <= 1.0:
            raise ComponentParamsError(f"$name.amplitude: must be in [0, 1], got {amplitude}")
        if cell < 1:
            raise ComponentParamsError(f"$name.cell: must be >= 1 pixel, got {cell}")
        self.amplitude = amplitude
        self.cell = cell

    def pattern(
        self, height: int, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``[H, W]`` checkerboard: +1 on the top-left square, alternating with -1."""
        rows = torch.arange(height, device=device) // self.cell
        cols = torch.arange(width, device=device) // self.cell
        parity = (rows[:, None] + cols[None, :]) % 2
        return (1 - 2 * parity).to(dtype)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        board = self.pattern(images.shape[-2], images.shape[-1], images.device, images.dtype)
        return (images + self.amplitude * board).clamp(0.0, 1.0)
'''

_TRIGGER_TEST = r'''"""Tests of the `$name` trigger plugin: the Trigger contract and what defines it.

Run::

    python -m pytest $test_path

No pytest import, so loading this folder as a plugin folder is harmless.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.attacks import build_attack_trigger
from bench.errors import BenchError
from bench.plugins import load_plugin_file
from bench.registry import REGISTRY, Component

PLUGIN = Path(__file__).with_name("$module.py")


def _component() -> Component:
    load_plugin_file(PLUGIN)
    return REGISTRY.get("trigger", "$name")


def _images(n: int = 4, c: int = 3, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(0))


def test_registered_from_this_file_with_a_strength_parameter():
    comp = _component()
    assert comp.source == f"file:{PLUGIN.resolve()}"
    assert comp.factory.strength_param in {p.name for p in comp.params}


def test_contract_shape_range_determinism_any_size():
    trigger = _component().create()
    for shape in [(4, 3, 16, 16), (2, 1, 4, 4), (1, 3, 5, 7)]:
        x = _images(*shape)
        out = trigger(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, trigger(x))
        assert not torch.equal(out, x)


def test_zero_strength_leaves_images_unchanged():
    comp = _component()
    trigger = comp.create(**{comp.factory.strength_param: 0.0})
    x = _images()
    assert torch.equal(trigger(x), x)


def test_adds_a_checkerboard_of_plus_minus_amplitude():
    trigger = _component().create(amplitude=0.2, cell=1)
    x = torch.full((1, 1, 4, 4), 0.5)
    diff = (trigger(x) - x)[0, 0]
    assert torch.allclose(diff.abs(), torch.full_like(diff, 0.2))
    assert diff[0, 0] > 0 and diff[0, 1] < 0 and diff[1, 0] < 0 and diff[1, 1] > 0


def test_bad_parameters_are_rejected():
    comp = _component()
    for bad in ({"amplitude": 1.5}, {"cell": 0}, {"amplitud": 0.1}):
        try:
            comp.create(**bad)
        except BenchError:
            continue
        raise AssertionError(f"{bad} was accepted")


def test_badpatches_stamps_it_on_every_patch():
    trigger = build_attack_trigger("$name", {"amplitude": 0.2}, "badpatches", (4, 4))
    x = torch.full((2, 1, 16, 16), 0.5)
    patches = (trigger(x) - x)[0, 0].reshape(4, 4, 4, 4).permute(0, 2, 1, 3)
    assert torch.equal(patches, patches[:1, :1].expand(4, 4, 4, 4))
'''

_MODEL = r'''"""$name: a tiny patch-level Mixture-of-Experts classifier (written by `bench new model $name`).

Make it yours: say here which paper the architecture comes from and change the layers. Keep the surface
of :class:`bench.models.base.BenchModel`: the engine builds the model with ``input_shape``,
``num_classes``, ``mean`` and ``std`` (taken from the data set, never from the scenario) plus the
parameters below; inputs are images in [0, 1] (normalisation is the model's first layer);
``forward_routing`` returns the logits and the batch's :class:`~bench.models.base.Routing` (or None for a
model without routing); ``patch_grid`` / ``patch_px`` tell BadPatches and the routing analysis where the
patches are; ``parameter_groups`` names the router ("gate") and expert parameters for quantization scopes;
``prunable_convs`` lists the convolutions fine-pruning may prune.

The model: a 3x3 convolution, then a patch embedding (kernel = stride = ``patch``) gives one feature
vector per patch; each expert's router scores every patch and keeps its top ``topk`` (expert choice, as in
pMoE), with gates softmax-normalised over the kept patches; an expert is a 1x1 convolution on the patches
scaled by its gates; the experts' outputs are summed over patches and experts and classified. About 90%
test accuracy on 16x16 digits after 8 epochs (``train: {epochs: 8, lr: 0.1}``).

Check it::

    bench plugins --plugins $path
    python -m pytest $test_path

Use it: list the file under a scenario's ``plugins:`` (a path relative to the scenario file), then::

    models: [{name: $name, experts: 2, topk: 4}]
"""

from __future__ import annotations

import torch
from torch import nn

from bench.errors import ComponentParamsError
from bench.models.base import BenchModel, Normalize, Routing
from bench.registry import register_model


class $cls(BenchModel):
    """Patch embedding, per-expert top-k routing over patches, 1x1-convolution experts, linear head."""

    patch_grid: tuple[int, int]
    patch_px: tuple[int, int]

    def __init__(
        self,
        *,
        input_shape: tuple[int, int, int],
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        patch: int = 4,
        channels: int = 32,
        experts: int = 2,
        topk: int = 4,
    ) -> None:
        super().__init__()
        c_in, height, width = input_shape
        if patch < 1 or height % patch or width % patch:
            raise ComponentParamsError(
                f"$name.patch: must divide the {height}x{width} input into whole patches, got {patch}"
            )
        rows, cols = height // patch, width // patch
        if channels < 1 or experts < 1:
            raise ComponentParamsError(
                f"$name: channels and experts must be >= 1, got channels={channels}, experts={experts}"
            )
        if not 1 <= topk <= rows * cols:
            raise ComponentParamsError(f"$name.topk: must be in [1, {rows * cols}] (patches), got {topk}")
        self.patch_grid = (rows, cols)
        self.patch_px = (patch, patch)
        self.topk = topk
        self.normalize = Normalize(tuple(mean), tuple(std))
        self.embed = nn.Sequential(  # a 3x3 convolution, then one feature vector per patch
            nn.Conv2d(c_in, channels, kernel_size=3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=patch, stride=patch), nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.router = nn.Conv2d(channels, experts, kernel_size=1, bias=False)
        self.experts = nn.ModuleList(nn.Conv2d(channels, channels, kernel_size=1) for _ in range(experts))
        self.head = nn.Linear(channels, num_classes)

    def forward_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        h = self.embed(self.normalize(x))  # [N, D, rows, cols]: one feature vector per patch
        scores = self.router(h).flatten(2)  # [N, E, rows * cols]
        top, indices = scores.topk(self.topk, dim=2)
        gates = top.softmax(dim=2)  # over each expert's kept patches
        n, e, _ = scores.shape
        gate_map = torch.zeros_like(scores).scatter(2, indices, gates).view(n, e, *self.patch_grid)
        mixed = sum(torch.relu(expert(h * gate_map[:, i : i + 1])) for i, expert in enumerate(self.experts))
        logits = self.head(mixed.sum(dim=(2, 3)))  # type: ignore[union-attr]
        return logits, Routing(indices, gates, scores, self.patch_grid, self.patch_px)

    def parameter_groups(self) -> dict[str, list[str]]:
        names = [n for n, _ in self.named_parameters()]
        return {
            "gate": [n for n in names if n.startswith("router.")],
            "experts": [n for n in names if n.startswith("experts.")],
        }

    def prunable_convs(self) -> list[tuple[str, nn.Conv2d]]:
        return [(f"experts.{i}", conv) for i, conv in enumerate(self.experts)]


@register_model("$name")
def create_$module(
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    patch: int = 4,
    channels: int = 32,
    experts: int = 2,
    topk: int = 4,
) -> $cls:
    """Tiny patch-level MoE: ``patch``-pixel patches, ``experts`` experts keeping ``topk`` patches each."""
    return $cls(
        input_shape=input_shape, num_classes=num_classes, mean=mean, std=std, patch=patch,
        channels=channels, experts=experts, topk=topk,
    )
'''

_MODEL_TEST = r'''"""Tests of the `$name` model plugin: the BenchModel surface and its routing.

Run::

    python -m pytest $test_path

No pytest import, so loading this folder as a plugin folder is harmless.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.errors import BenchError
from bench.models.base import BenchModel
from bench.plugins import load_plugin_file
from bench.registry import REGISTRY, Component

PLUGIN = Path(__file__).with_name("$module.py")
CONTEXT = {"input_shape": (1, 16, 16), "num_classes": 10, "mean": (0.3,), "std": (0.3,)}


def _component() -> Component:
    load_plugin_file(PLUGIN)
    return REGISTRY.get("model", "$name")


def _model(**params: object) -> BenchModel:
    torch.manual_seed(0)
    return _component().create(**CONTEXT, **params)


def _images(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def test_registered_from_this_file():
    comp = _component()
    assert comp.source == f"file:{PLUGIN.resolve()}"
    assert {"experts", "topk"} <= {p.name for p in comp.params}
    assert "input_shape" not in {p.name for p in comp.params}  # supplied by the engine


def test_logits_and_routing_shapes():
    model = _model(experts=3, topk=5).eval()
    logits, routing = model.forward_routing(_images())
    assert logits.shape == (8, 10)
    assert routing.indices.shape == routing.gates.shape == (8, 3, 5)
    assert routing.scores.shape == (8, 3, 16)
    assert routing.grid == model.patch_grid == (4, 4) and routing.patch_px == model.patch_px == (4, 4)
    assert torch.equal(model(_images()), logits)


def test_every_expert_keeps_exactly_topk_distinct_patches():
    _, routing = _model(experts=2, topk=4).eval().forward_routing(_images())
    mask = routing.selection_mask()
    assert mask.shape == (8, 2, 4, 4)
    assert (mask.flatten(2).sum(2) == 4).all()
    assert (routing.gates > 0).all() and (routing.gates <= 1).all()
    top = routing.scores.topk(4, dim=2).values
    assert torch.allclose(routing.scores.gather(2, routing.indices), top)


def test_parameter_groups_and_prunable_convs_name_real_parameters():
    model = _model()
    names = {n for n, _ in model.named_parameters()}
    groups = model.parameter_groups()
    assert groups["gate"] and groups["experts"] and set(groups["gate"]) | set(groups["experts"]) <= names
    assert [type(conv).__name__ for _, conv in model.prunable_convs()] == ["Conv2d", "Conv2d"]


def test_router_and_experts_receive_gradients():
    model = _model()
    model(_images()).sum().backward()
    assert model.router.weight.grad is not None and model.router.weight.grad.abs().sum() > 0
    assert all(conv.weight.grad.abs().sum() > 0 for _, conv in model.prunable_convs())


def test_bad_parameters_are_rejected():
    for bad in ({"topk": 17}, {"patch": 5}, {"experts": 0}):
        try:
            _model(**bad)
        except BenchError:
            continue
        raise AssertionError(f"{bad} was accepted")
'''

_DATASET = r'''"""$name: scikit-learn's 8x8 digits with a transform (written by `bench new dataset $name`).

Make it yours: say here where the data comes from (paper, licence, link) and load it instead. Keep the
contract: the factory returns a :class:`bench.data.base.TensorData` with both splits as float tensors
``[N, C, H, W]`` in [0, 1] and int64 labels ``[N]``, the per-channel ``mean`` / ``std`` of the training
split (the model normalises with them), and the same data for the same parameters every time. Read files
lazily inside the factory, never at import, so ``bench plugins`` stays fast.

This one: the 1,797 digits of :func:`sklearn.datasets.load_digits` (no download), optionally inverted
(dark digits on a light background), upsampled to ``image_size``, split by a seeded stratified draw.

Check it::

    bench plugins --plugins $path
    python -m pytest $test_path

Use it: list the file under a scenario's ``plugins:`` (a path relative to the scenario file), then::

    datasets: [{name: $name, image_size: 16}]
"""

from __future__ import annotations

import torch

from bench.data import TensorData, resize_images, stratified_indices
from bench.errors import ComponentParamsError
from bench.registry import register_dataset


@register_dataset("$name")
def create_$module(
    image_size: int = 16, invert: bool = True, test_fraction: float = 0.2, split_seed: int = 0
) -> TensorData:
    """scikit-learn's digits, inverted (light background) by default, upsampled to ``image_size``."""
    from sklearn.datasets import load_digits

    if image_size < 1:
        raise ComponentParamsError(f"$name.image_size: must be >= 1 pixel, got {image_size}")
    if not 0.0 < test_fraction < 1.0:
        raise ComponentParamsError(f"$name.test_fraction: must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).div(16.0).unsqueeze(1)
    if invert:
        images = 1.0 - images
    images = resize_images(images, image_size)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[stratified_indices(labels, round(test_fraction * len(labels)), split_seed)] = True
    train_x = images[~is_test].contiguous()
    var, mean = torch.var_mean(train_x, dim=(0, 2, 3), correction=0)
    return TensorData(
        name="$name",
        train_x=train_x,
        train_y=labels[~is_test].contiguous(),
        test_x=images[is_test].contiguous(),
        test_y=labels[is_test].contiguous(),
        num_classes=10,
        mean=tuple(float(m) for m in mean),
        std=tuple(max(float(v) ** 0.5, 1 / 255) for v in var),
        augment="none",
        classes=[str(c) for c in range(10)],
    )
'''

_DATASET_TEST = r'''"""Tests of the `$name` data set plugin: the TensorData contract and its transform.

Run::

    python -m pytest $test_path

No pytest import, so loading this folder as a plugin folder is harmless.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.data import TensorData
from bench.errors import BenchError
from bench.plugins import load_plugin_file
from bench.registry import REGISTRY, Component

PLUGIN = Path(__file__).with_name("$module.py")


def _component() -> Component:
    load_plugin_file(PLUGIN)
    return REGISTRY.get("dataset", "$name")


def _data(**params: object) -> TensorData:
    return _component().create(**params)


def test_registered_from_this_file():
    assert _component().source == f"file:{PLUGIN.resolve()}"


def test_splits_are_tensors_in_unit_range_with_every_class():
    data = _data(image_size=12)
    assert data.input_shape == (1, 12, 12) and data.num_classes == 10
    assert len(data.train_y) + len(data.test_y) == 1797 and len(data.test_y) == round(0.2 * 1797)
    for x, y in ((data.train_x, data.train_y), (data.test_x, data.test_y)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and len(x) == len(y)
        assert x.min() >= 0 and x.max() <= 1
        assert set(y.tolist()) == set(range(10))
    assert torch.allclose(torch.tensor(data.mean), data.train_x.mean(dim=(0, 2, 3)), atol=1e-5)


def test_same_parameters_same_data():
    a, b = _data(), _data()
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(_data(split_seed=1).test_y, a.test_y)


def test_invert_turns_the_background_light():
    inverted, plain = _data(invert=True), _data(invert=False)
    assert inverted.mean[0] > 0.5 > plain.mean[0]
    assert torch.allclose(inverted.train_x, 1.0 - plain.train_x, atol=1e-5)


def test_bad_parameters_are_rejected():
    for bad in ({"image_size": 0}, {"test_fraction": 1.0}, {"invert": "maybe"}):
        try:
            _data(**bad)
        except BenchError:
            continue
        raise AssertionError(f"{bad} was accepted")
'''

_DEFENSE = r'''"""$name: fine-tuning on the defender's clean data (written by `bench new defense $name`).

Make it yours: say here which paper this defense comes from (title, authors, year, link) and change
``run``. Keep the contract of :class:`bench.defenses.base.Defense`: the engine builds the defense from
its parameters (``__init__``'s keywords are its schema; every defense declares ``budget``, the share of
the clean training set the defender holds), then calls ``run(model, ctx)`` once per attacked model with a
fresh copy of it; ``run`` may change the model in place and returns one
:class:`~bench.defenses.base.DefenseStage` per step, in order. ``stages`` names the steps that carry
weights (the engine evaluates each of them at every quantization config); ``ctx.clean_x`` / ``clean_y``
are the defender's clean images, ``ctx.train_cfg`` the scenario's training settings, ``ctx.seed`` the
cell's seed. ``ctx.trigger`` / ``ctx.target`` are the benchmark's knowledge, for metrics only.

This one fine-tunes the whole model on the clean data with the scenario's optimizer settings.

Check it::

    bench plugins --plugins $path
    python -m pytest $test_path

Use it: list the file under a scenario's ``plugins:`` (a path relative to the scenario file), then::

    defenses: [{name: $name, epochs: 2}]
"""

from __future__ import annotations

from bench.defenses.base import DEFAULT_BUDGET, Defense, DefenseContext, DefenseStage, check_budget, snapshot
from bench.errors import ComponentParamsError
from bench.models.base import BenchModel
from bench.registry import register_defense
from bench.train import fit


@register_defense("$name")
class $cls(Defense):
    """Fine-tune the attacked model on the defender's clean data.

    Arguments:
        epochs (int): fine-tuning epochs, >= 1. Default: 2.
        lr (float | None): learning rate; None uses the scenario's ``train.lr``. Default: 0.01.
        budget (float): share of the clean training set the defender holds, in (0, 1]. Default: 0.05.

    Stages: "finetuned" (weights; metrics ``epochs``, ``n_clean``, ``loss_before``, ``loss_after``).
    """

    stages = ("finetuned",)
    name = "$name"

    def __init__(self, epochs: int = 2, lr: float | None = 0.01, budget: float = DEFAULT_BUDGET) -> None:
        if epochs < 1:
            raise ComponentParamsError(f"$name.epochs: must be >= 1, got {epochs}")
        if lr is not None and lr <= 0:
            raise ComponentParamsError(f"$name.lr: must be > 0 (or null for the scenario's), got {lr}")
        self.epochs = epochs
        self.lr = lr
        self.budget = check_budget(self.name, budget)

    def run(self, model: BenchModel, ctx: DefenseContext) -> list[DefenseStage]:
        cfg = dict(ctx.train_cfg)
        if self.lr is not None:
            cfg["lr"] = self.lr
        result = fit(model, ctx.clean_x, ctx.clean_y, cfg, seed=ctx.seed, augment=ctx.augment,
                     on_epoch=ctx.on_epoch, epochs=self.epochs)
        metrics = {"epochs": self.epochs, "n_clean": int(len(ctx.clean_y)),
                   "loss_before": result.epoch_losses[0], "loss_after": result.epoch_losses[-1]}
        return [DefenseStage("finetuned", snapshot(model), metrics)]
'''

_DEFENSE_TEST = r'''"""Tests of the `$name` defense plugin: the Defense contract and what the defense does.

Run::

    python -m pytest $test_path

No pytest import, so loading this folder as a plugin folder is harmless.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bench.defenses.base import DefenseContext
from bench.errors import BenchError
from bench.models.base import BenchModel
from bench.plugins import load_plugin_file
from bench.registry import REGISTRY, Component

PLUGIN = Path(__file__).with_name("$module.py")
TRAIN = {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}


class Linear(BenchModel):
    """A linear classifier on 8x8 images: small enough to test a defense in a second."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.fc(x.flatten(1)), None


def _component() -> Component:
    load_plugin_file(PLUGIN)
    return REGISTRY.get("defense", "$name")


def _context(seed: int = 0) -> DefenseContext:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 4
    x = (torch.rand(64, 1, 8, 8, generator=gen) * 0.2 + (y.float() / 4).view(-1, 1, 1, 1)).clamp(0, 1)
    return DefenseContext(clean_x=x, clean_y=y, train_cfg=TRAIN, seed=seed, num_classes=4)


def _loss(model: BenchModel, ctx: DefenseContext) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(ctx.clean_x), ctx.clean_y))


def test_registered_from_this_file_with_a_budget():
    comp = _component()
    assert comp.source == f"file:{PLUGIN.resolve()}"
    assert "budget" in {p.name for p in comp.params}


def test_returns_its_declared_stages_with_the_models_weights():
    comp = _component()
    torch.manual_seed(0)
    model, ctx = Linear(), _context()
    stages = comp.create().run(model, ctx)
    assert tuple(s.name for s in stages if s.state is not None) == comp.factory.stages
    for stage in stages:
        if stage.state is not None:
            assert stage.state.keys() == model.state_dict().keys()
            assert all(torch.equal(stage.state[k], v) for k, v in model.state_dict().items())


def test_fine_tuning_lowers_the_clean_loss_and_leaves_the_data_alone():
    torch.manual_seed(0)
    model, ctx = Linear(), _context()
    before, clean_x = _loss(model, ctx), ctx.clean_x.clone()
    (stage,) = _component().create(epochs=3, lr=0.1).run(model, ctx)
    assert _loss(model, ctx) < before
    assert stage.metrics["loss_after"] < stage.metrics["loss_before"]
    assert torch.equal(ctx.clean_x, clean_x)


def test_same_seed_same_result():
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Linear()
        states.append(_component().create().run(model, _context(seed=3))[0].state)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_bad_parameters_are_rejected():
    comp = _component()
    for bad in ({"epochs": 0}, {"lr": -1.0}, {"budget": 1.5}, {"epoch": 2}):
        try:
            comp.create(**bad)
        except BenchError:
            continue
        raise AssertionError(f"{bad} was accepted")
'''

PLUGIN_TEMPLATES: dict[str, str] = {
    "trigger": _TRIGGER, "defense": _DEFENSE, "model": _MODEL, "dataset": _DATASET,
}
TEST_TEMPLATES: dict[str, str] = {
    "trigger": _TRIGGER_TEST, "defense": _DEFENSE_TEST, "model": _MODEL_TEST, "dataset": _DATASET_TEST,
}
