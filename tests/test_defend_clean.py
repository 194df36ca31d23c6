"""``defend_clean: true``: every defense is applied to the clean models too (false alarms, repair cost)."""

from __future__ import annotations

from PIL import Image
from typer.testing import CliRunner

from bench import plan as planning
from bench import scenario as sc
from bench.cli import app
from bench.der_heatmap import der_grid
from tests.conftest import tiny_scenario

DEFENSES = [{"name": "fine-tuning", "epochs": 1}]


def test_clean_models_get_defended_only_when_asked():
    plain = planning.build(sc.resolve(tiny_scenario(defenses=DEFENSES)))
    both = planning.build(sc.resolve(tiny_scenario(defenses=DEFENSES, defend_clean=True)))
    defend = lambda p: [j for j in p.jobs if j.kind == "defend"]  # noqa: E731
    assert [j.spec["attack"] for j in defend(plain)] == [plain.cells[-1].attack]
    assert len(defend(both)) == 2 and {j.spec["poison_rate"] for j in defend(both)} == {None, 0.1}
    # the attacked model's defense is the same job either way (nothing reruns when the flag is turned on)
    assert {j.id for j in defend(plain)} < {j.id for j in defend(both)}


def test_report_shows_the_defended_clean_model_outside_the_der_leaderboard(write_scenario, tmp_path):
    path = write_scenario(tiny_scenario(defenses=DEFENSES, defend_clean=True))
    result = CliRunner().invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"),
                                      "--reports-dir", str(tmp_path / "reports")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = (tmp_path / "reports" / "tiny.md").read_text()
    assert "· clean model (no attack)" in report
    board = report.split("### Defense leaderboard (by DER)", 1)[1].split("##", 1)[0]
    assert "| badnets" in board and "| clean" not in board
    # the attack x defense DER picture: one line (badnets), one column (fine-tuning), clean models left out
    picture = tmp_path / "reports" / "tiny" / "der-digits-pmoe.png"
    assert f"![der-digits-pmoe](tiny/{picture.name})" in report
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width > 100


def test_der_grid_holds_the_rows_der_per_attack_and_stage():
    rows = [_Row("badnets", 0.1, "fine-tuning / finetuned", 0.8), _Row("blend", 0.1, "fine-tuning / finetuned", None),
            _Row("clean", None, "fine-tuning / finetuned", None), _Row("badnets", 0.1, "-", None)]
    ((key, (lines, columns, cells)),) = der_grid(rows).items()
    assert key == ("digits", "pmoe") and lines == ["badnets", "blend"] and columns == ["fine-tuning / finetuned"]
    assert cells[("badnets", "fine-tuning / finetuned")].der.mean == 0.8


def test_der_grid_keeps_two_attacks_of_one_trigger_apart():
    """BadNets on the image and as BadPatches share the short name: each keeps its own line and cell."""
    rows = [_Row("badnets (apply=image)", 0.1, "nad / distilled", 0.7),
            _Row("badnets (apply=badpatches)", 0.1, "nad / distilled", 0.2),
            _Row("blend (apply=image)", 0.1, "nad / distilled", 0.5)]
    ((_, (lines, _, cells)),) = der_grid(rows).items()
    assert lines == ["badnets (apply=image)", "badnets (apply=badpatches)", "blend"]
    assert cells[("badnets (apply=image)", "nad / distilled")].der.mean == 0.7
    assert cells[("badnets (apply=badpatches)", "nad / distilled")].der.mean == 0.2


class _Summary:
    def __init__(self, mean: float | None) -> None:
        self.mean, self.n = mean, int(mean is not None)


class _Row:
    """The fields of a report row the picture reads (a report row needs a store behind it)."""

    def __init__(self, attack: str, rate: float | None, defense: str, der: float | None) -> None:
        self.dataset, self.model, self.train, self.quant = "digits", "pmoe", "-", "fp32"
        self.attack, self.poison_rate, self.defense, self.der = attack, rate, defense, _Summary(der)
        self.status = "ok"
