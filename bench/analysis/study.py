"""``bench analyze`` as a library call: pick stored models of a run, route its test set through them,
and write the routing pictures and metrics of every selected attack setting.

For each setting (see :mod:`bench.analysis.cells`) the images are the ASR set (test images whose label
is not the target; the whole test set for a clean-only run) and the same images triggered, so the
numbers sit beside the stored BA and ASR. Each model is routed once over them; metrics, maps, heat maps
and histograms all come from those selections.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.analysis import maps
from bench.analysis.cells import Group, load_model, select_groups
from bench.analysis.routing import (
    NoRoutingError,
    RoutingTally,
    has_routing,
    layer_selection_masks,
    patch_touch_mask,
)
from bench.attacks.poison import asr_mask, triggered_test_set
from bench.errors import BenchError, StoreError
from bench.jobs import JobContext, build_trigger, restore_trigger
from bench.store import Store, open_existing
from bench.train import resolve_device


@dataclass
class SettingResult:
    """What one attack setting gave: per model label its metrics (stored BA / ASR plus routing)."""

    group: Group
    metrics: dict[str, dict[str, Any]]
    files: list[Path]
    skipped: list[str] = field(default_factory=list)


@dataclass
class AnalysisOptions:
    """Which models and images (``None`` filters match everything)."""

    dataset: str | None = None
    model: str | None = None
    attack: str | None = None
    apply: str | None = None
    rate: float | None = None
    seed: int | None = None
    images: int = 4
    image_seed: int = 0
    test_images: int | None = None
    batch_size: int = 512
    device: str = "auto"


def analyze_run(run_dir: str | Path, out_dir: str | Path | None = None,
                options: AnalysisOptions | None = None) -> list[SettingResult]:
    """Analyze the stored models of ``run_dir`` selected by ``options``; write into ``out_dir``
    (default ``run_dir/analysis``). Raises :class:`BenchError` when nothing can be analyzed."""
    opts = options or AnalysisOptions()
    if opts.images < 1:
        raise BenchError(f"--images: must be at least 1, got {opts.images}")
    if opts.test_images is not None and opts.test_images < 1:
        raise BenchError(f"--test-images: must be at least 1, got {opts.test_images}")
    if opts.batch_size < 1:
        raise BenchError(f"--batch-size: must be at least 1, got {opts.batch_size}")
    from bench.runner import run_folder

    store = open_existing(run_folder(run_dir))
    cells = store.get_meta("cells")
    if not cells:
        raise BenchError(f"{run_dir}: this store holds no plan yet; run `bench run SCENARIO` first")
    groups = select_groups(cells, dataset=opts.dataset, model=opts.model, attack=opts.attack,
                           apply=opts.apply, rate=opts.rate, seed=opts.seed)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "analysis"
    ctx = JobContext(store, resolve_device(opts.device))
    results, problems = [], []
    for group in groups:
        try:
            results.append(_analyze_group(group, store, ctx, out, opts))
        except (NoRoutingError, StoreError) as exc:
            problems.append(str(exc))
    if not results:
        raise BenchError(f"{run_dir}: nothing to analyze: {problems[0]}" if problems else
                         f"{run_dir}: nothing to analyze")
    _list_pictures(store, [f for r in results for f in r.files])
    return results


def _list_pictures(store: Store, files: list[Path]) -> None:
    """Add the PNGs written to the store's list, which the report links (``bench report`` renders it)."""
    listed = list(store.get_meta("analysis_pictures", []))
    for path in files:
        resolved = str(Path(path).resolve())
        if resolved.endswith(".png") and resolved not in listed:
            listed.append(resolved)
    store.set_meta("analysis_pictures", listed)


def _analyze_group(
    group: Group, store: Store, ctx: JobContext, out: Path, opts: AnalysisOptions
) -> SettingResult:
    data = ctx.dataset(group.dataset)
    models, skipped = {}, []
    for ref in group.models:
        try:
            models[ref.label] = load_model(store, ref, group.model, data, ctx.device)
        except StoreError as exc:
            skipped.append(f"{ref.label}: {exc}")
    if not models:
        raise StoreError(f"{group.title}: no stored model ({'; '.join(skipped)})")
    first = next(iter(models.values()))
    if not has_routing(first):
        raise NoRoutingError(f"model '{group.model['name']}' has no routing (no patch grid); `bench analyze` "
                             "needs a patch-level MoE model such as pmoe or pmoe-paper")
    grid = tuple(first.patch_grid)
    clean_x, triggered_x, trigger = _image_sets(group, data.test_x, data.test_y, first, opts, store)
    touch = patch_touch_mask(trigger, tuple(clean_x.shape[1:]), grid) if trigger is not None else None
    clean_sel, trig_sel, metrics = {}, {}, {}
    clean_layers: dict[str, list[torch.Tensor]] = {}
    trig_layers: dict[str, list[torch.Tensor]] = {}
    records = store.records([ref.eval_job for ref in group.models])
    for ref in group.models:
        if ref.label not in models:
            continue
        model = models[ref.label]
        # every MoE layer's selection (the last one is the model's routing, which the metrics describe)
        clean_layers[ref.label] = layer_selection_masks(model, clean_x, opts.batch_size)
        clean_sel[ref.label] = clean_layers[ref.label][-1]
        tally = RoutingTally(int(clean_sel[ref.label].shape[1]), grid, touch)
        if triggered_x is not None:
            trig_layers[ref.label] = layer_selection_masks(model, triggered_x, opts.batch_size)
            trig_sel[ref.label] = trig_layers[ref.label][-1]
        tally.update(clean_sel[ref.label], trig_sel.get(ref.label))
        record = records.get(ref.eval_job)
        stored = {k: record.metrics[k] for k in ("ba", "asr") if record is not None and k in record.metrics}
        metrics[ref.label] = {**stored, **tally.result()}
    files = _draw(group, clean_x, triggered_x, clean_sel, trig_sel, touch, out, opts)
    files += _draw_layers(group, clean_x, triggered_x, clean_layers, trig_layers, touch, out, opts)
    summary = out / f"{group.stem}-metrics.json"
    summary.write_text(json.dumps({"setting": group.title, "models": metrics}, indent=2), encoding="utf-8")
    return SettingResult(group, metrics, [*files, summary], skipped)


def _image_sets(
    group: Group, test_x: torch.Tensor, test_y: torch.Tensor, model: torch.nn.Module, opts: AnalysisOptions,
    store: Store | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """The clean images, the same images triggered (the ASR set) and the trigger, or only the clean test
    set for a clean-only group; a seeded subset of ``opts.test_images`` when given."""
    if opts.test_images is not None and opts.test_images < len(test_y):
        gen = torch.Generator().manual_seed(opts.image_seed)
        pick = torch.randperm(len(test_y), generator=gen)[: opts.test_images].sort().values.to(test_x.device)
        test_x, test_y = test_x[pick], test_y[pick]
    if group.attack is None:
        return test_x, None, None
    trigger = build_trigger(group.attack, model)  # type: ignore[arg-type]
    if store is not None and getattr(trigger, "learned", False):  # input-aware: the generator its train job stored
        for ref in group.models:
            try:
                restore_trigger(trigger, store, ref.train_job or ref.eval_job)
                break
            except StoreError:
                continue
    target = group.attack["target"]
    triggered, _ = triggered_test_set(test_x, test_y, trigger, target)
    if len(triggered) == 0:
        raise StoreError(f"{group.title}: no test image outside the target class {target} to trigger")
    return test_x[asr_mask(test_y, target)], triggered, trigger


def _draw(
    group: Group,
    clean_x: torch.Tensor,
    triggered_x: torch.Tensor | None,
    clean_sel: dict[str, torch.Tensor],
    trig_sel: dict[str, torch.Tensor],
    touch: torch.Tensor | None,
    out: Path,
    opts: AnalysisOptions,
) -> list[Path]:
    gen = torch.Generator().manual_seed(opts.image_seed)
    pick = torch.randperm(len(clean_x), generator=gen)[: opts.images].to(clean_x.device)
    shown_trig = triggered_x[pick] if triggered_x is not None else None
    files = [maps.draw_selection_maps(
        clean_x[pick], {k: v[pick] for k, v in clean_sel.items()}, out / f"{group.stem}-selection.png",
        shown_trig, {k: v[pick] for k, v in trig_sel.items()} or None, touch,
        f"{group.title}: patches each expert keeps",
    )]
    freqs, values = {}, {}
    for label, sel in clean_sel.items():
        sides = [("clean", clean_x, sel)]
        if label in trig_sel and triggered_x is not None:
            sides.append(("triggered", triggered_x, trig_sel[label]))
        for side, x, s in sides:
            freqs[f"{label}, {side}"] = maps.selection_frequency(s)
            values[f"{label}, {side}"] = (maps.expert_patch_values(x, s),
                                          maps.patch_means(x, tuple(s.shape[2:])).flatten().cpu())
    n = len(clean_x)
    files.append(maps.draw_frequency_maps(
        freqs, out / f"{group.stem}-frequency.png", touch,
        f"{group.title}: how often each expert keeps each patch ({n} images)",
    ))
    files.append(maps.draw_patch_values(
        values, out / f"{group.stem}-patch-values.png",
        f"{group.title}: mean pixel value of kept patches ({n} images)",
    ))
    return files


def per_layer_labels(layers: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``"<label>, MoE layer i/L"`` -> selection, for every model with more than one MoE layer (empty when
    no model has several: the main pictures already show the only layer)."""
    return {
        f"{label}, MoE layer {i + 1}/{len(sels)}": sel
        for label, sels in layers.items() if len(sels) > 1
        for i, sel in enumerate(sels)
    }


def _draw_layers(
    group: Group,
    clean_x: torch.Tensor,
    triggered_x: torch.Tensor | None,
    clean_layers: dict[str, list[torch.Tensor]],
    trig_layers: dict[str, list[torch.Tensor]],
    touch: torch.Tensor | None,
    out: Path,
    opts: AnalysisOptions,
) -> list[Path]:
    """For models with several MoE layers (V-MoE): token routing over the patch grid per MoE layer, as
    selection maps of the shown images and as frequency heat maps over all images."""
    clean = per_layer_labels(clean_layers)
    if not clean:
        return []
    trig = per_layer_labels(trig_layers)
    gen = torch.Generator().manual_seed(opts.image_seed)
    pick = torch.randperm(len(clean_x), generator=gen)[: opts.images].to(clean_x.device)
    files = [maps.draw_selection_maps(
        clean_x[pick], {k: v[pick] for k, v in clean.items()}, out / f"{group.stem}-layers-selection.png",
        triggered_x[pick] if triggered_x is not None else None, {k: v[pick] for k, v in trig.items()} or None,
        touch, f"{group.title}: tokens each expert keeps, per MoE layer",
    )]
    freqs = {}
    for label, sel in clean.items():
        freqs[f"{label}, clean"] = maps.selection_frequency(sel)
        if label in trig:
            freqs[f"{label}, triggered"] = maps.selection_frequency(trig[label])
    files.append(maps.draw_frequency_maps(
        freqs, out / f"{group.stem}-layers-frequency.png", touch,
        f"{group.title}: how often each expert keeps each token, per MoE layer ({len(clean_x)} images)",
    ))
    return files
