"""Leaderboards from stored results: pure functions from (cells, job records) to tables.

Per dataset x model (x train setting), a table laid out like Table 1 of the BadPatches paper: rows are
attack x poison rate, columns ASR, BA, CAD (and RA), each as mean ± std over seeds with n. Then a ranked
leaderboard under the headline rule stated in the report.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from bench import __version__
from bench.metrics import Summary, defense_effectiveness_rating, summarize
from bench.store import JobRecord

HEADLINE_ASR = 0.90
HEADLINE_CAD = 0.02
HEADLINE_RULE = (
    f"an attack's score is the lowest poison rate at which its mean ASR reaches {HEADLINE_ASR:.0%} "
    f"with mean CAD at most {HEADLINE_CAD * 100:.0f} points; lower is better, ties broken by higher ASR"
)


@dataclass
class Row:
    """One aggregated line: a group of cells that differ only by seed."""

    dataset: str
    model: str
    train: str
    attack: str
    poison_rate: float | None
    quant: str
    defense: str
    ba: Summary
    asr: Summary
    ra: Summary
    cad: Summary
    seeds: int
    missing: int
    key: dict[str, Any] | None = None  # raw names (dataset, model, trigger, apply) to match references
    der: Summary = Summary(float("nan"), float("nan"), 0)  # defended rows: DER against the model before
    routed: Summary = Summary(float("nan"), float("nan"), 0)  # share of triggered images routing the trigger
    jaccard: Summary = Summary(float("nan"), float("nan"), 0)  # routing overlap clean vs triggered

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset, "model": self.model, "train": self.train, "attack": self.attack,
            "poison_rate": self.poison_rate, "quant": self.quant, "defense": self.defense,
            "seeds": self.seeds, "missing": self.missing,
        }
        for name in ("ba", "asr", "ra", "cad", "der", "routed", "jaccard"):
            s: Summary = getattr(self, name)
            out[f"{name}_mean"] = None if math.isnan(s.mean) else s.mean
            out[f"{name}_std"] = None if math.isnan(s.std) else s.std
            out[f"{name}_n"] = s.n
        return out


def _flat(spec: dict[str, Any]) -> dict[str, Any]:
    """A component spec as one flat dict: trigger params inline, nested blocks as dotted keys."""
    out: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "params" and isinstance(value, dict):
            out.update(_flat(value))
        elif isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        else:
            out[key] = value
    return out


def component_label(spec: dict[str, Any] | None, varying: set[str]) -> str:
    """``name`` plus the parameters that vary between the scenario's components of that kind."""
    if spec is None:
        return "clean"
    flat = _flat(spec)
    name = spec["name"] + ("+qcb" if spec.get("objective") else "")
    extras = [f"{k.removeprefix('objective.')}={flat[k]}" for k in sorted(varying)
              if k in flat and k not in ("name", "objective.name")]
    return name + (f" ({', '.join(extras)})" if extras else "")


def varying_keys(specs: list[dict[str, Any] | None]) -> set[str]:
    """Parameter names whose value differs between two ``specs`` of the same name (worth showing)."""
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for spec in specs:
        if spec is not None:
            by_name[str(spec.get("name", ""))].append(_flat(spec))
    out = set()
    for flats in by_name.values():
        for k in {k for f in flats for k in f}:
            if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1:
                out.add(k)
    if any(f.get("apply") == "badpatches" for flats in by_name.values() for f in flats):
        out.add("apply")
    return out


def aggregate(cells: list[dict[str, Any]], records: dict[str, JobRecord]) -> list[Row]:
    """Group cells over seeds and summarise BA, ASR, RA and CAD (per-seed CAD against the clean model)."""
    labels = {kind: varying_keys([c[kind] for c in cells]) for kind in ("dataset", "model", "train", "attack")}
    labels["defense"] = varying_keys([
        {k: v for k, v in c["defense"].items() if k != "stage"} for c in cells if c.get("defense")
    ])
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        key = (
            component_label(cell["dataset"], labels["dataset"]),
            component_label(cell["model"], labels["model"]),
            _train_label(cell["train"], labels["train"]),
            component_label(cell["attack"], labels["attack"]),
            cell["poison_rate"],
            _quant_label(cell.get("quant")),
            _defense_label(cell.get("defense"), labels["defense"]),
        )
        groups[key].append(cell)
    rows = []
    for key, members in groups.items():
        ba, asr, ra, cad, der, routed, jaccard = [], [], [], [], [], [], []
        missing = 0
        for cell in members:
            rec = records.get(cell["eval_job"])
            clean = records.get(cell["clean_eval_job"])
            before = records.get(cell["base_eval_job"]) if cell.get("base_eval_job") else None
            if rec is not None and before is not None and "asr" in rec.metrics and "asr" in before.metrics:
                der.append(defense_effectiveness_rating(
                    before.metrics["asr"], rec.metrics["asr"], before.metrics["ba"], rec.metrics["ba"]))
            if rec is None:
                missing += 1
                continue
            if "not_applicable" in rec.metrics:
                continue
            ba.append(rec.metrics["ba"])
            if "asr" in rec.metrics:
                asr.append(rec.metrics["asr"])
                ra.append(rec.metrics["ra"])
            if "route_rate_any" in rec.metrics:
                routed.append(rec.metrics["route_rate_any"])
                jaccard.append(rec.metrics["route_jaccard_mean"])
            if clean is not None and cell["attack"] is not None:
                cad.append(clean.metrics["ba"] - rec.metrics["ba"])
        first = members[0]
        raw = {
            "dataset": first["dataset"]["name"], "model": first["model"]["name"],
            "attack": first["attack"]["name"] if first["attack"] else None,
            "apply": first["attack"]["apply"] if first["attack"] else None,
        }
        rows.append(
            Row(*key, ba=summarize(ba), asr=summarize(asr), ra=summarize(ra), cad=summarize(cad),
                seeds=len(members), missing=missing, key=raw, der=summarize(der), routed=summarize(routed),
                jaccard=summarize(jaccard))
        )
    # a defense's stages keep the plan's order (pruned before finetuned): the sort is stable, the key omits them
    rows.sort(key=lambda r: (r.dataset, r.model, natural(r.train), natural(r.quant),
                             natural(r.defense.rsplit(" / ", 1)[0]), r.attack != "clean", natural(r.attack),
                             r.poison_rate or 0.0))
    return rows


def natural(label: str) -> tuple[str | float, ...]:
    """Sort key that orders the numbers inside a label by value ("epochs=5" before "epochs=20")."""
    parts = re.split(r"(\d+(?:\.\d+)?)", label)
    return tuple(float(p) if i % 2 else p for i, p in enumerate(parts))


def _defense_label(defense: dict[str, Any] | None, varying: set[str]) -> str:
    if not defense:
        return "-"
    spec = {k: v for k, v in defense.items() if k != "stage"}
    return f"{component_label(spec, varying)} / {defense['stage']}"


def _train_label(train: dict[str, Any], varying: set[str]) -> str:
    extras = [f"{k}={train[k]}" for k in sorted(varying) if k in train]
    return ", ".join(extras) if extras else "-"


def _quant_label(quant: dict[str, Any] | None) -> str:
    if not quant:
        return "fp32"
    return str(quant.get("label", "fp32"))


def leaderboard(rows: list[Row]) -> list[dict[str, Any]]:
    """Rank attacks per (dataset, model, train, quant, defense) under :data:`HEADLINE_RULE`."""
    by_attack: dict[tuple[Any, ...], list[Row]] = defaultdict(list)
    for row in rows:
        if row.attack != "clean" and row.poison_rate is not None:
            by_attack[(row.dataset, row.model, row.train, row.quant, row.defense, row.attack)].append(row)
    entries = []
    for (dataset, model, train, quant, defense, attack), members in by_attack.items():
        members.sort(key=lambda r: r.poison_rate or 0.0)
        hit = next(
            (r for r in members if r.asr.n and r.asr.mean >= HEADLINE_ASR and r.cad.n and r.cad.mean <= HEADLINE_CAD),
            None,
        )
        best_asr = max((r.asr.mean for r in members if r.asr.n), default=float("nan"))
        entries.append({
            "dataset": dataset, "model": model, "train": train, "quant": quant, "defense": defense, "attack": attack,
            "score_rate": hit.poison_rate if hit else None,
            "asr_at_score": hit.asr.mean if hit else None,
            "cad_at_score": hit.cad.mean if hit else None,
            "best_asr": None if math.isnan(best_asr) else best_asr,
        })
    entries.sort(key=lambda e: (e["dataset"], e["model"], e["train"], e["quant"], e["defense"],
                                e["score_rate"] is None, e["score_rate"] or 0.0, -(e["asr_at_score"] or 0.0)))
    return entries


def provenance(records: dict[str, JobRecord]) -> list[dict[str, Any]]:
    """Which code computed the stored jobs behind a report: one entry per (package version, git commit),
    most jobs first. A commit ending in ``+dirty`` ran from a checkout with uncommitted changes."""
    counts = Counter((r.version, r.git_commit) for r in records.values())
    return [{"version": v, "git_commit": c, "jobs": n} for (v, c), n in counts.most_common()]


def provenance_line(entries: list[dict[str, Any]]) -> str | None:
    """One sentence on the code behind the results, a warning when it was not one clean commit."""
    if not entries:
        return None
    if len(entries) == 1 and not entries[0]["git_commit"].endswith("+dirty"):
        e = entries[0]
        return f"All {e['jobs']} stored jobs behind these results ran on commit {e['git_commit'][:12]} " \
               f"(pmoe-bench {e['version']})."
    parts = ", ".join(f"{e['git_commit'][:12]}{'+dirty' if e['git_commit'].endswith('+dirty') else ''} "
                      f"(pmoe-bench {e['version']}, {e['jobs']} job{'s' if e['jobs'] != 1 else ''})"
                      for e in entries)
    return (f"**Provenance: the stored jobs behind these results ran on {len(entries)} code state"
            f"{'s' if len(entries) != 1 else ''}: {parts}.** A job is reused while its spec is unchanged, "
            "even if the code that computed it has changed since (or had uncommitted changes, +dirty); "
            "`bench run --fresh` recomputes every job with the current code.")


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:g}%"


def to_markdown(rows: list[Row], meta: dict[str, Any], pictures: list[str] | None = None,
                routing_pictures: list[str] | None = None) -> str:
    """The report as markdown: header, one Table-1-style table per group, the ranked leaderboard."""
    lines = [f"# pmoe-bench report: {meta.get('scenario', '?')}", ""]
    lines.append(
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by pmoe-bench {meta.get('version', __version__)} "
        f"(commit {meta.get('git_commit', 'unknown')}), device {meta.get('device', '?')}. "
        "Values are percentages, mean ± sample std over seeds (n = seeds with a result). "
        "BA: clean test accuracy. ASR: triggered non-target test images classified as the target. "
        "CAD: BA of the clean model (same model, data, seed) minus BA of the attacked one. "
        "RA: triggered non-target images still classified correctly. Trigger routed: triggered images on "
        "which some expert's top-k keeps a patch the trigger touched. Routing Jaccard: mean overlap of each "
        "expert's kept patches, clean vs the same image triggered (1 = unchanged)."
    )
    lines.append("")
    origin = provenance_line(meta.get("provenance") or [])
    if origin:
        lines += [origin, ""]
    groups: dict[tuple[str, ...], list[Row]] = defaultdict(list)
    for row in rows:
        if row.quant == "fp32" and row.defense == "-":  # quantized and defended results: own tables below
            groups[(row.dataset, row.model, row.train, row.quant, row.defense)].append(row)
    for (dataset, model, train, quant, defense), members in groups.items():
        title = f"## {dataset} · {model}"
        for name, value, default in (("train", train, "-"), ("quantization", quant, "fp32"), ("defense", defense, "-")):
            if value != default:
                title += f" · {name}: {value}"
        lines += [title, ""]
        show_routing = any(r.routed.n for r in members)
        table = [
            [r.attack, _pct(r.poison_rate), r.asr.fmt(), r.ba.fmt(), r.cad.fmt(), r.ra.fmt()]
            + ([r.routed.fmt(), r.jaccard.fmt(scale=1, digits=2)] if show_routing else [])
            + ([f"{r.missing} missing"] if r.missing else [])
            for r in members
        ]
        headers = ["attack", "poison rate", "ASR", "BA", "CAD", "RA"]
        if show_routing:
            headers += ["trigger routed", "routing Jaccard"]
        if any(r.missing for r in members):
            headers.append("note")
            table = [t + [""] * (len(headers) - len(t)) for t in table]
        lines += [tabulate(table, headers=headers, tablefmt="github"), ""]
    board = leaderboard([r for r in rows if r.quant == "fp32" and r.defense == "-"])
    if board:
        lines += ["## Leaderboard", "", f"Headline rule: {HEADLINE_RULE}.", ""]
        table = []
        for rank, e in enumerate(board, start=1):
            table.append([
                rank, e["dataset"], e["model"], e["attack"],
                _pct(e["score_rate"]) if e["score_rate"] is not None else "not reached",
                "-" if e["asr_at_score"] is None else f"{e['asr_at_score'] * 100:.1f}",
                "-" if e["cad_at_score"] is None else f"{e['cad_at_score'] * 100:.1f}",
                "-" if e["best_asr"] is None else f"{e['best_asr'] * 100:.1f}",
            ])
        headers = ["rank", "dataset", "model", "attack", "lowest rate", "ASR there", "CAD there", "best ASR"]
        lines += [tabulate(table, headers=headers, tablefmt="github"), ""]
    lines += defense_tables(rows)
    lines += detection_table(meta.get("detections", []))
    lines += quantization_tables(rows)
    lines += reference_table(rows, meta.get("reference"))
    if pictures:
        lines += ["## Triggers", "", "Clean test images beside each attack's triggered version, over the model's "
                  "patch grid; the lower rows show |x' - x| scaled to its maximum.", ""]
        for picture in pictures:
            lines += [f"![{Path(picture).stem}]({picture})", ""]
    if routing_pictures:
        lines += ["## Routing pictures", "", "Drawn by `bench analyze`: which patches each expert keeps on clean and "
                  "triggered images (clean, backdoored and defended models), how often each patch is kept over the "
                  "test set, and the pixel values of the kept patches.", ""]
        lines += [f"- [{Path(picture).name}]({picture})" for picture in routing_pictures] + [""]
    return "\n".join(lines)


def defense_tables(rows: list[Row]) -> list[str]:
    """Defenses as the BadPatches paper's Table 3 (BA and ASR before the defense and after each stage,
    per attack and poison rate), then a leaderboard of defenses ranked by mean DER, per attack (fp32)."""
    defended = [r for r in rows if r.defense != "-" and r.quant == "fp32"]
    if not defended:
        return []
    lines = ["## Defenses", "",
             "BA and ASR (%) before the defense and after each stage; DER (BackdoorBench) = "
             "[max(0, ASR drop) - max(0, BA drop) + 1] / 2, 1 is best, 0.5 means no effect.", ""]
    before = {(r.dataset, r.model, r.train, r.attack, r.poison_rate): r
              for r in rows if r.defense == "-" and r.quant == "fp32"}
    groups: dict[tuple[Any, ...], list[Row]] = defaultdict(list)
    for r in defended:
        groups[(r.dataset, r.model, r.train, r.attack, r.poison_rate)].append(r)
    for key, members in groups.items():
        dataset, model, _train, attack, rate = key
        lines += [f"### {dataset} · {model} · {attack} at {_pct(rate)}", ""]
        ref = before.get(key)
        table = [["before defense", ref.ba.fmt() if ref else "-", ref.asr.fmt() if ref else "-", "-"]]
        table += [[r.defense, r.ba.fmt(), r.asr.fmt(), r.der.fmt(scale=1, digits=3)] for r in members]
        lines += [tabulate(table, headers=["stage", "BA", "ASR", "DER"], tablefmt="github"), ""]
    ranked = sorted(defended, key=lambda r: (r.dataset, r.model, r.attack, -(r.der.mean if r.der.n else -1)))
    table = [[r.dataset, r.model, r.attack, _pct(r.poison_rate), r.defense, r.der.fmt(scale=1, digits=3),
              r.asr.fmt(), r.ba.fmt()] for r in ranked]
    lines += ["### Defense leaderboard (by DER)", "",
              tabulate(table, headers=["dataset", "model", "attack", "poison rate", "defense / stage", "DER", "ASR",
                                       "BA"], tablefmt="github"), ""]
    return lines


def detections(defenses: list[dict[str, Any]], records: dict[str, JobRecord]) -> list[dict[str, Any]]:
    """Numeric metrics of every defense stage (detection results such as Neural Cleanse's flagged class
    and anomaly index, STRIP's FRR / FAR / AUROC), averaged over seeds per attacked model and defense."""
    labels = {kind: varying_keys([d[kind] for d in defenses]) for kind in ("attack", "defense")}
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for d in defenses:
        rec = records.get(d["job"])
        if rec is None:
            continue
        key = (d["dataset"]["name"], d["model"]["name"], component_label(d["attack"], labels["attack"]),
               d["poison_rate"], component_label(d["defense"], labels["defense"]))
        groups[key].append(rec.metrics)
    out = []
    for (dataset, model, attack, rate, defense), metric_list in groups.items():
        values: dict[str, list[float]] = defaultdict(list)
        for metrics in metric_list:
            for stage, stage_metrics in metrics.items():
                if isinstance(stage_metrics, dict):
                    for name, value in stage_metrics.items():
                        if isinstance(value, int | float) and not isinstance(value, bool):
                            values[f"{stage}.{name}"].append(float(value))
        out.append({"dataset": dataset, "model": model, "attack": attack, "poison_rate": rate, "defense": defense,
                    "seeds": len(metric_list),
                    "metrics": {k: sum(v) / len(v) for k, v in sorted(values.items())}})
    return out


def detection_table(entries: list[dict[str, Any]]) -> list[str]:
    """Detection results, one line per defense and attacked model (means over seeds)."""
    if not entries:
        return []
    table = []
    for e in entries:
        shown = ", ".join(f"{k}={v:.3g}" for k, v in e["metrics"].items())
        table.append([e["dataset"], e["model"], e["attack"], _pct(e["poison_rate"]), e["defense"], e["seeds"], shown])
    return ["## Defense metrics", "",
            "What each defense measured on its own terms (detection: flagged class, anomaly index; "
            "STRIP: false rejection / acceptance, AUROC), mean over seeds.", "",
            tabulate(table, headers=["dataset", "model", "attack", "poison rate", "defense", "n", "metrics"],
                     tablefmt="github"), ""]


def reference_table(rows: list[Row], reference: dict[str, Any] | None) -> list[str]:
    """Ours beside the published values of the scenario's ``reference`` block, cell by cell (fp32)."""
    if not reference or not reference.get("values"):
        return []
    table = []
    for ref in reference["values"]:
        match = [
            r for r in rows
            if r.quant == "fp32" and r.defense == "-" and r.key and r.key["dataset"] == ref["dataset"]
            and r.key["attack"] == ref["attack"] and r.key["apply"] == ref.get("apply", "image")
            and r.poison_rate is not None and math.isclose(r.poison_rate, ref["poison_rate"])
            and (ref.get("model") in (None, r.key["model"]))
        ]
        line: list[Any] = [ref["dataset"], ref["attack"], ref.get("apply", "image"), _pct(ref["poison_rate"])]
        for metric in ("asr", "ba", "cad"):
            theirs = ref.get(metric)
            ours: Summary | None = getattr(match[0], metric) if match else None
            ours_v = ours.mean * 100 if ours is not None and ours.n else None
            line += [
                "-" if ours_v is None else f"{ours_v:.1f}",
                "-" if theirs is None else f"{theirs:.1f}",
                "-" if ours_v is None or theirs is None else f"{ours_v - theirs:+.1f}",
            ]
        table.append(line)
    headers = ["dataset", "trigger", "apply", "poison rate", "ASR ours", "ASR theirs", "Δ", "BA ours",
               "BA theirs", "Δ", "CAD ours", "CAD theirs", "Δ"]
    return [f"## Published values: {reference.get('source', '')}", "",
            "Ours (mean over seeds, fp32, no defense) beside the published numbers; Δ = ours - theirs, in points.",
            "", tabulate(table, headers=headers, tablefmt="github"), ""]


def _bits(label: str) -> str:
    return label.split("/")[0]


def _variant(label: str) -> str:
    return label.split("/", 1)[1] if "/" in label else "-"


def _bits_order(bits: str) -> tuple[int, int]:
    return (0, 0) if bits == "fp32" else (1, -int(bits.removeprefix("int")))


def quantization_tables(rows: list[Row]) -> list[str]:
    """The quantized-backdoor paper's layouts, when the scenario has a quantization axis.

    * Accuracy under quantization (its Table 1): clean models per training setting (QAT rows included)
      and PTQ config -> BA and the change against the same model at fp32.
    * Dormancy: per attack and poison rate, BA / ASR at fp32 and every bit-width, one line per scope
      and variant; a dormant backdoor shows a low ASR at fp32 and a high one at its target bits.
    """
    if all(r.quant == "fp32" for r in rows):
        return []
    lines = ["## Accuracy under quantization", "",
             "Clean models. PTQ: post-training quantization of the trained weights (Eq. 2); "
             "train: the training setting (qat_bits = quantization-aware training). Δ: BA change against fp32.", ""]
    fp32 = {(r.dataset, r.model, r.train, r.defense, r.attack, r.poison_rate): r for r in rows if r.quant == "fp32"}
    table = []
    for r in rows:
        if r.attack != "clean" or not r.ba.n:
            continue
        ref = fp32.get((r.dataset, r.model, r.train, r.defense, r.attack, r.poison_rate))
        delta = "-" if ref is None or not ref.ba.n or r.quant == "fp32" else f"{(r.ba.mean - ref.ba.mean) * 100:+.2f}"
        table.append([r.dataset, r.model, r.train, r.quant, r.ba.fmt(scale=100, digits=2), delta])
    lines += [tabulate(table, headers=["dataset", "model", "train", "PTQ", "BA", "Δ vs fp32"], tablefmt="github"), ""]

    bits = sorted({_bits(r.quant) for r in rows}, key=_bits_order)
    lines += ["## Dormancy", "",
              "BA / ASR (%) of each attacked model at fp32 and after PTQ at each bit-width, per scope and variant. "
              "Dormancy gap = ASR at the target bit-width - ASR at fp32.", ""]
    cells: dict[tuple[Any, ...], dict[str, Row]] = defaultdict(dict)
    for r in rows:
        if r.attack == "clean":
            continue
        key = (r.dataset, r.model, r.train, r.defense, r.attack, r.poison_rate)
        cells[key][r.quant] = r
    table = []
    for (dataset, model, _train, _defense, attack, rate), by_quant in cells.items():
        base = by_quant.get("fp32")
        for variant in sorted({_variant(q) for q in by_quant if q != "fp32"}):
            line = [dataset, model, attack, _pct(rate), variant]
            for b in bits:
                r = base if b == "fp32" else by_quant.get(f"{b}/{variant}")
                line.append("-" if r is None or not r.ba.n else f"{r.ba.mean * 100:.1f} / {r.asr.mean * 100:.1f}")
            table.append(line)
    headers = ["dataset", "model", "attack", "poison rate", "scope/variant", *bits]
    lines += [tabulate(table, headers=headers, tablefmt="github"), ""]
    return lines


def to_csv(rows: list[Row]) -> str:
    """One CSV line per aggregated row, fractions (not percentages)."""
    buf = io.StringIO()
    dicts = [r.to_dict() for r in rows]
    if not dicts:
        return ""
    writer = csv.DictWriter(buf, fieldnames=list(dicts[0]))
    writer.writeheader()
    writer.writerows(dicts)
    return buf.getvalue()


def to_json(rows: list[Row], meta: dict[str, Any]) -> str:
    """Rows and leaderboard as JSON, fractions (not percentages)."""
    return json.dumps(
        {"meta": meta, "headline_rule": HEADLINE_RULE, "rows": [r.to_dict() for r in rows],
         "leaderboard": leaderboard(rows)},
        indent=2,
    )
