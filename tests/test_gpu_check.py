"""benchmarks/gpu_check.py keeps working on a machine without a GPU: it exits 0 quickly, says which GPU
parts it skipped, and runs its CPU parts (host reads per step, determinism) with their findings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_PARTS = {"smoke-bf16-cl-compile", "smoke-workers2", "smoke-ray", "paper-epoch", "memory"}


def test_gpu_check_on_the_cpu_skips_the_gpu_parts_and_runs_the_others(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert set(summary["gpu_parts_skipped"]) == GPU_PARTS
    assert set(summary["cpu_parts_ran"]) == {"host-syncs", "determinism"}
    assert summary["failed"] == []
    parts = {p["part"]: p for p in summary["parts"]}
    assert parts["smoke-fp32"]["why"] == "--quick"
    assert parts["host-syncs"]["result"]["train_per_step"] == 0
    assert parts["host-syncs"]["result"]["qcb_per_step"] == 0
    assert parts["determinism"]["result"]["default"] is True
    assert "GPU parts skipped: " in proc.stdout and "paper-epoch" in proc.stdout  # the table says so
