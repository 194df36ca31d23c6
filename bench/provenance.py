"""What a job ran on, stored with its row, and the report-side warning when rows of different hardware mix.

Why: a row's ``device`` string ("cuda") does not tell an A100 from an H100, and the same seeded spec gives
slightly different numbers on a CPU and on a GPU (TF32 matmuls, cuDNN's choice of algorithms, float sum
order), so a study whose rows come from both should say so.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from bench.store import JobRecord


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: torch.device, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The hardware and numerics settings a job on ``device`` ran with (called where the job ran), with the
    job's speed-only settings (``channels_last``, ``compile``: :attr:`bench.plan.Job.settings`), which are
    not in its spec."""
    env: dict[str, Any] = {
        "device_type": device.type,
        "torch": torch.__version__,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    if settings:
        env["speed_settings"] = dict(settings)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        env.update(
            gpu=torch.cuda.get_device_name(index),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
            tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),
            cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
            cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
        )
    else:
        env.update(cpu=cpu_model(), threads=torch.get_num_threads())
    return env


def hardware(record: JobRecord) -> tuple[str, str]:
    """``(kind, model)`` of the hardware a row ran on: kind ``cpu`` or ``gpu`` (rows older than the
    environment column: from their device string, model ``?``)."""
    env = record.environment
    kind = env.get("device_type") or record.device.split(":", 1)[0]
    if kind == "cuda":
        return "gpu", str(env.get("gpu", "?"))
    if kind == "cpu":
        return "cpu", str(env.get("cpu", "?"))
    return kind, "?"


def mixed_hardware_warning(records: Iterable[JobRecord]) -> str | None:
    """A warning when the rows behind a report ran on both CPUs and GPUs (or on several GPU models),
    else None. Rows that only inherited a failure or an n/a outcome count like the others."""
    counts = Counter(hardware(r) for r in records)
    kinds = {kind for kind, _ in counts}
    gpus = sorted({model for kind, model in counts if kind == "gpu"})
    if len(kinds) <= 1 and len(gpus) <= 1:
        return None
    parts = ", ".join(f"{n} on {kind}" + (f" ({model})" if model != "?" else "")
                      for (kind, model), n in counts.most_common())
    what = "CPUs and GPUs" if {"cpu", "gpu"} <= kinds else ("several GPU models" if len(gpus) > 1
                                                              else "several kinds of device")
    return (f"The stored jobs behind these results ran on {what}: {parts}. The same seeded job gives slightly "
            "different numbers on different hardware (TF32, cuDNN algorithms, float sum order); compare cells "
            "computed on one kind of device, or rerun with `bench run --fresh` on one.")
