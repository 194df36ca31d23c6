"""Plugins end to end: `bench new` scaffolds, the worked examples (SIG, CLP), bad plugins failing clearly,
a plugin file outside the repo, and a real installed package found through its entry point."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from bench import cli
from bench.cli import app
from bench.errors import BenchError, ComponentParamsError, PluginError
from bench.plugins import load_plugin_file
from bench.registry import REGISTRY
from bench.scaffold import new
from bench.store import Store
from tests.conftest import tiny_scenario

ROOT = Path(__file__).resolve().parents[1]
SIG = ROOT / "plugins" / "sig.py"
CLP = ROOT / "plugins" / "clp.py"
EXAMPLE = ROOT / "scenarios" / "plugins_example.yaml"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(autouse=True)
def forget_tmp_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Unregister whatever this test's temporary plugin files registered (names are reused across tests);
    print ``bench plugins`` tables wide enough that names are not folded."""
    monkeypatch.setattr(cli.out, "width", 250)
    yield
    for comp in list(REGISTRY.list()):
        if comp.source.startswith(f"file:{tmp_path}"):
            REGISTRY.unregister(comp.kind, comp.name)


def _component(path: Path, kind: str, name: str):
    load_plugin_file(path)
    return REGISTRY.get(kind, name)


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


# --- bench new ---------------------------------------------------------------------------------------------

KIND_NAMES = {"attack": ("trigger", "scaf-trig"), "defense": ("defense", "scaf_def"),
              "model": ("model", "scaf_moe"), "dataset": ("dataset", "scaf_digits")}


@pytest.mark.parametrize("kind", list(KIND_NAMES))
def test_new_writes_a_plugin_that_lists_and_whose_own_tests_pass(kind, tmp_path):
    reg_kind, name = KIND_NAMES[kind]
    result = invoke("new", kind, name, "--dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    module = name.replace("-", "_")
    plugin, test_file = tmp_path / f"{module}.py", tmp_path / f"test_{module}.py"
    assert plugin.is_file() and test_file.is_file()
    assert f"wrote {plugin}" in result.output
    listed = invoke("plugins", "--plugins", str(plugin), "--kind", reg_kind, name)
    assert listed.exit_code == 0, listed.output
    assert name in listed.output and "file:" in listed.output
    assert f'register_{reg_kind}("{name}")' in plugin.read_text()
    # the generated tests are real tests of the generated component: run every one of them
    spec = importlib.util.spec_from_file_location(f"generated_test_{module}", test_file)
    assert spec is not None and spec.loader is not None
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    names = [n for n in dir(tests) if n.startswith("test_")]
    assert len(names) >= 4
    for test_name in names:
        getattr(tests, test_name)()


def test_generated_components_together_run_in_a_scenario(tmp_path):
    for kind, (_, name) in KIND_NAMES.items():
        new(kind, name, tmp_path)
    scenario = tiny_scenario(
        name="generated",
        plugins=[f"{n.replace('-', '_')}.py" for _, n in KIND_NAMES.values()],  # relative to the scenario
        models=[{"name": "scaf_moe", "experts": 2, "topk": 4}],
        datasets=[{"name": "scaf_digits", "image_size": 16}],
        attacks=[{"name": "scaf-trig", "amplitude": 0.2, "target": 0, "apply": "badpatches"},
                 {"name": "scaf-trig", "amplitude": 0.2, "target": 0,  # inside the qcb objective
                  "objective": {"name": "qcb", "target_bits": 4, "scope": "whole"}}],
        quantization={"bits": ["fp32", 4], "scopes": ["whole"]},
        defenses=[{"name": "scaf_def", "epochs": 1}],
    )
    path = tmp_path / "generated.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    result = invoke("run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                    str(tmp_path / "reports"))
    assert result.exit_code == 0, result.output
    report = (tmp_path / "reports" / "generated.md").read_text()
    for text in ("scaf_digits", "scaf_moe", "scaf-trig", "scaf_def / finetuned", "## Dormancy", "scaf-trig+qcb",
                 "triggers-scaf_digits-scaf_moe-0.png"):
        assert text in report, text
    records = Store(tmp_path / "runs" / "generated").records().values()
    defended_at_int4 = [r for r in records if r.kind == "evaluate" and r.spec.get("stage")
                        and (r.spec.get("quant") or {}).get("bits") == 4]
    assert defended_at_int4 and all("asr" in r.metrics for r in defended_at_int4)  # defenses at every config


def test_new_refuses_to_overwrite_without_force(tmp_path):
    assert invoke("new", "attack", "twice", "--dir", str(tmp_path)).exit_code == 0
    (tmp_path / "twice.py").write_text("# my edits\n")
    again = invoke("new", "attack", "twice", "--dir", str(tmp_path))
    assert again.exit_code == 2
    assert "twice.py already exists" in again.output and "--force" in again.output
    assert (tmp_path / "twice.py").read_text() == "# my edits\n"
    forced = invoke("new", "attack", "twice", "--dir", str(tmp_path), "--force")
    assert forced.exit_code == 0 and "register_trigger" in (tmp_path / "twice.py").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["attack", "My Attack"], "NAME must start with a lower-case letter"),
        (["attack", "1st"], "NAME must start with a lower-case letter"),
        (["attack", "badnets"], "trigger 'badnets' is already registered (by built-in)"),
        (["model", "pmoe"], "model 'pmoe' is already registered"),
        (["model", "bench_model"], "hides bench's own BenchModel"),
        (["dataset", "class"], "Python keyword"),
        (["widget", "foo"], "KIND must be one of attack, defense, model, dataset"),
    ],
)
def test_new_rejects_bad_kind_or_name_with_exit_2(args, message, tmp_path):
    result = invoke("new", *args, "--dir", str(tmp_path))
    assert result.exit_code == 2
    assert message in result.output
    assert not list(tmp_path.glob("*.py"))


def test_a_folder_of_plugins_loads_the_plugins_and_not_their_tests(tmp_path):
    new("attack", "folder-trig", tmp_path)
    _write(tmp_path / "test_extra.py", "raise RuntimeError('a test file was imported as a plugin')\n")
    _write(tmp_path / "conftest.py", "raise RuntimeError('conftest was imported as a plugin')\n")
    result = invoke("plugins", "--plugins", str(tmp_path), "--kind", "trigger", "folder-*")
    assert result.exit_code == 0, result.output
    assert "folder-trig" in result.output


def test_new_as_a_library_call_returns_the_paths(tmp_path):
    written = new("dataset", "lib-call", tmp_path / "deeper")
    assert written == [tmp_path / "deeper" / "lib_call.py", tmp_path / "deeper" / "test_lib_call.py"]
    with pytest.raises(PluginError, match="already exists"):
        new("dataset", "lib-call", tmp_path / "deeper")


# --- the worked examples: SIG and CLP ---------------------------------------------------------------------


def test_sig_adds_the_papers_horizontal_sinusoid():
    comp = _component(SIG, "trigger", "sig")
    assert comp.source == f"file:{SIG}"
    trigger = comp.create()
    assert trigger.delta == pytest.approx(20 / 255) and trigger.frequency == 6
    assert comp.factory.strength_param == "delta"
    x = torch.full((2, 3, 16, 24), 0.5)
    diff = trigger(x) - x
    expected = torch.tensor([20 / 255 * math.sin(2 * math.pi * j * 6 / 24) for j in range(24)])
    assert torch.allclose(diff, expected.expand_as(diff), atol=1e-6)  # every row and channel alike
    clipped = trigger(torch.ones(1, 1, 8, 16))
    assert clipped.max() <= 1 and clipped.min() < 1
    assert torch.equal(comp.create(delta=0.0)(x), x)
    assert torch.equal(trigger(x), trigger(x))


def test_sig_refuses_a_signal_that_vanishes_on_small_patches():
    trigger = _component(SIG, "trigger", "sig").create(frequency=6)
    with pytest.raises(ComponentParamsError, match="signal vanishes"):
        trigger(torch.rand(1, 1, 4, 4))  # 6 periods over 4 columns samples only zeros of the sine
    assert trigger(torch.rand(1, 1, 5, 7)).shape == (1, 1, 5, 7)
    mask = trigger.touched_mask((1, 16, 16))
    assert not mask[:, 0].any() and mask[:, 1].all()  # sin(0) = 0: column 0 is untouched
    for bad in ({"delta": 1.5}, {"frequency": 0.0}):
        with pytest.raises(BenchError):
            _component(SIG, "trigger", "sig").create(**bad)


def test_sig_documents_that_it_is_clean_label_in_the_paper_and_dirty_label_here():
    text = SIG.read_text()
    assert "https://arxiv.org/abs/1902.11237" in text
    assert "clean label" in text.lower() and "dirty label" in text.lower()


def _clp_context(x: torch.Tensor):
    from bench.defenses.base import DefenseContext

    return DefenseContext(clean_x=x, clean_y=torch.zeros(len(x), dtype=torch.long), train_cfg={}, seed=0,
                          num_classes=10)


def test_clp_prunes_a_planted_high_lipschitz_channel_and_nothing_else():
    comp = _component(CLP, "defense", "clp")
    torch.manual_seed(0)
    model = REGISTRY.get("model", "pmoe").create(input_shape=(1, 16, 16), num_classes=10, mean=(0.3,),
                                                   std=(0.3,), width=1, experts=2, topk=4)
    paired = model.trunk.group1[0].conv1  # feeds bn2 directly: pruned at the BatchNorm (as the paper)
    expert = model.moe.experts[1].conv  # feeds no BatchNorm: pruned at the convolution's output
    router_before = model.moe.router.weight.detach().clone()
    with torch.no_grad():
        paired.weight[5] *= 50
        expert.weight[3] *= 50
    (stage,) = comp.create(u=3.0).run(model, _clp_context(torch.rand(4, 1, 16, 16)))
    assert stage.name == "pruned" and comp.factory.stages == ("pruned",)
    bn2 = model.trunk.group1[0].bn2
    assert bn2.weight[5] == 0 and bn2.bias[5] == 0 and (bn2.weight[:5] != 0).all()
    assert expert.weight[3].abs().sum() == 0 and expert.bias[3] == 0 and expert.weight[2].abs().sum() > 0
    assert torch.equal(model.moe.router.weight, router_before)  # router kernels are not channels
    assert stage.metrics["pruned_channels"] >= 2 and stage.metrics["layers"] > 5
    fresh = REGISTRY.get("model", "pmoe").create(input_shape=(1, 16, 16), num_classes=10, mean=(0.3,),
                                                   std=(0.3,), width=1, experts=2, topk=4)
    fresh.load_state_dict(stage.state)  # the stage's weights fit the same model


def test_clp_with_a_huge_threshold_changes_nothing_and_needs_no_routing():
    comp = _component(CLP, "defense", "clp")
    torch.manual_seed(0)
    model = REGISTRY.get("model", "dense").create(input_shape=(1, 16, 16), num_classes=10, mean=(0.3,),
                                                    std=(0.3,), width=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (stage,) = comp.create(u=1e6).run(model, _clp_context(torch.rand(2, 1, 16, 16)))
    assert stage.metrics["pruned_channels"] == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(BenchError, match="clp.u"):
        comp.create(u=-1.0)


def test_example_scenario_plans_with_both_plugins_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # plugin paths resolve relative to the scenario file, not the cwd
    result = invoke("plan", str(EXAMPLE), "--json", "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    specs = [j["spec"] for j in plan["jobs_detail"]]
    assert {s["attack"]["name"] for s in specs if s.get("attack")} == {"sig"}
    assert {s["defense"]["u"] for s in specs if s.get("defense")} == {3.0, 2.0}


# --- bad plugins fail clearly: exit 2, the file and the problem ---------------------------------------------

BAD_PLUGINS = {
    "syntax": ("def broken(:\n", "SyntaxError"),
    "import": ("import pmoe_bench_no_such_module\n", "No module named 'pmoe_bench_no_such_module'"),
    "abstract": (
        """
        from bench.attacks.base import Trigger
        from bench.registry import register_trigger

        @register_trigger("half-done")
        class HalfDone(Trigger):
            strength_param = "alpha"

            def __init__(self, alpha: float = 0.1) -> None:
                self.alpha = alpha
        """,
        "does not implement apply",
    ),
    "abstract_defense": (
        """
        from bench.defenses.base import Defense
        from bench.registry import register_defense

        @register_defense("no-run")
        class NoRun(Defense):
            stages = ("done",)
        """,
        "does not implement run",
    ),
    "taken": (
        """
        from bench.attacks.base import Trigger
        from bench.registry import register_trigger

        @register_trigger("blend")
        class MyBlend(Trigger):
            def apply(self, images):
                return images
        """,
        "trigger 'blend' from file:",
    ),
    "unresolved_annotation": (
        """
        from bench.attacks.base import Trigger
        from bench.registry import register_trigger

        @register_trigger("typo-type")
        class TypoType(Trigger):
            def __init__(self, size: "Integr" = 2) -> None:
                self.size = size

            def apply(self, images):
                return images
        """,
        "name 'Integr' is not defined",
    ),
    "unvalidatable_annotation": (
        """
        from typing import Protocol

        from bench.attacks.base import Trigger
        from bench.registry import register_trigger

        class Scorer(Protocol):
            def __call__(self, x: float) -> float: ...

        @register_trigger("protocol-param")
        class ProtocolParam(Trigger):
            def __init__(self, scorer: Scorer | None = None) -> None:
                self.scorer = scorer

            def apply(self, images):
                return images
        """,
        "parameter 'scorer'",
    ),
    "default_against_annotation": (
        """
        from bench.attacks.base import Trigger
        from bench.registry import register_trigger

        @register_trigger("bad-default")
        class BadDefault(Trigger):
            def __init__(self, size: int = "big") -> None:
                self.size = size

            def apply(self, images):
                return images
        """,
        "parameter 'size'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PLUGINS))
def test_bad_plugin_fails_with_exit_2_naming_the_file_and_the_problem(case, tmp_path):
    source, problem = BAD_PLUGINS[case]
    path = _write(tmp_path / f"bad_{case}.py", source)
    result = invoke("plugins", "--plugins", str(path))
    assert result.exit_code == 2, result.output
    assert f"plugin {path}:" in result.output
    assert problem in result.output
    assert "Traceback" not in result.output


def test_bad_plugin_named_by_a_scenario_fails_before_any_work(tmp_path, write_scenario):
    _write(tmp_path / "broken.py", "raise RuntimeError('plugin exploded')\n")
    path = write_scenario(tiny_scenario(plugins=["broken.py"]))
    result = invoke("run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                    str(tmp_path / "reports"))
    assert result.exit_code == 2
    assert f"plugin {tmp_path / 'broken.py'}:" in result.output
    assert "RuntimeError: plugin exploded" in result.output
    assert not (tmp_path / "runs").exists()


def test_missing_plugin_path_names_the_scenario_and_the_path(tmp_path, write_scenario):
    path = write_scenario(tiny_scenario(plugins=["nowhere/attack.py"]))
    result = invoke("plan", str(path))
    assert result.exit_code == 2
    assert "nowhere/attack.py" in result.output and "does not exist" in result.output


# --- a plugin file outside the repo, and an installed package ----------------------------------------------

STRIPES = """
    from __future__ import annotations

    from typing import ClassVar

    import torch

    from bench.attacks.base import Trigger
    from bench.registry import register_trigger


    @register_trigger("{name}")
    class Stripes(Trigger):
        \"\"\"Every other row brightened by ``alpha`` (a test plugin).\"\"\"

        strength_param: ClassVar[str] = "alpha"

        def __init__(self, alpha: float = 0.5) -> None:
            self.alpha = alpha

        def apply(self, images: torch.Tensor) -> torch.Tensor:
            out = images.clone()
            out[..., ::2, :] = (out[..., ::2, :] + self.alpha).clamp(0, 1)
            return out
"""


def test_plugin_file_outside_the_repo_works_through_the_plugins_option(tmp_path, write_scenario):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    plugin = _write(outside / "stripes.py", STRIPES.replace("{name}", "outside-stripes"))
    listed = invoke("plugins", "--plugins", str(plugin), "--kind", "trigger", "outside-*")
    assert listed.exit_code == 0 and "outside-stripes" in listed.output and "alpha" in listed.output
    assert f"file:{plugin}" in listed.output
    path = write_scenario(tiny_scenario(attacks=[{"name": "outside-stripes", "target": 1}]))
    planned = invoke("plan", str(path), "--json", "--plugins", str(plugin), "--runs-dir", str(tmp_path))
    assert planned.exit_code == 0, planned.output
    jobs = json.loads(planned.stdout)["jobs_detail"]
    attacks = [j["spec"]["attack"] for j in jobs if j["spec"].get("attack")]
    assert attacks and all(a["name"] == "outside-stripes" and a["params"] == {"alpha": 0.5} for a in attacks)
    typo = write_scenario(tiny_scenario(attacks=[{"name": "outside-stripes", "alpah": 0.3}]), "typo.yaml")
    rejected = invoke("plan", str(typo), "--plugins", str(plugin))
    assert rejected.exit_code == 2 and "did you mean 'alpha'" in rejected.output


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_installed_package_is_found_through_its_entry_point(tmp_path):
    project = tmp_path / "myplug"
    (project / "myplug_pkg").mkdir(parents=True)
    _write(project / "pyproject.toml", """
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "pmoe-bench-myplug"
        version = "0.0.1"

        [project.entry-points."pmoe_bench.plugins"]
        myplug = "myplug_pkg.triggers"

        [tool.setuptools]
        packages = ["myplug_pkg"]
    """)
    _write(project / "myplug_pkg" / "__init__.py", "")
    _write(project / "myplug_pkg" / "triggers.py", STRIPES.replace("{name}", "myplug-stripes"))
    scenario = tiny_scenario(name="myplug", attacks=[{"name": "myplug-stripes", "alpha": 0.4, "target": 2}])
    path = tmp_path / "myplug.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    installed = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(project))
    assert installed.returncode == 0, installed.stderr
    try:
        # entry points are read once per process: a fresh interpreter sees the new package
        listed = subprocess.run(
            [sys.executable, "-m", "bench.cli", "plugins", "--kind", "trigger", "myplug-*"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"},
        )
        assert listed.returncode == 0, listed.stderr
        assert "myplug-stripes" in listed.stdout and "package:pmoe-bench-myplug" in listed.stdout
        ran = subprocess.run(
            [sys.executable, "-m", "bench.cli", "run", str(path), "--runs-dir", str(tmp_path / "runs"),
             "--reports-dir", str(tmp_path / "reports"), "--device", "cpu"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
        assert ran.returncode == 0, ran.stderr[-2000:]
        report = (tmp_path / "reports" / "myplug.md").read_text()
        assert "myplug-stripes" in report and "clean" in report
    finally:
        removed = _pip("uninstall", "-y", "pmoe-bench-myplug")
    assert removed.returncode == 0, removed.stderr
