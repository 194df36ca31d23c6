"""GPU check: run whenever a GPU machine is at hand (under 8 minutes on one GPU). One summary table, and
the same as JSON with ``--out``.

Parts (each one timed; a failing part is recorded and the next one runs):

- ``smoke-fp32``, ``smoke-bf16-cl-compile``, ``smoke-workers2``, ``smoke-ray``: ``bench run
  scenarios/quickstart.yaml --smoke --device cuda`` end to end, then with ``precision: bf16``,
  ``channels_last`` and ``compile``, then ``--workers 2``, then ``--executor ray`` (a local Ray cluster).
- ``paper-epoch``: one training epoch of ``pmoe-paper`` on 50,000 CIFAR-10-shaped random images at batch
  128 (crop+flip on the device), fp32, then bf16 + channels_last, then bf16 + channels_last + compile
  (compiled in a warm-up fit first), against the 3-second target.
- ``host-syncs``: synchronisations per training step under ``torch.cuda.set_sync_debug_mode("warn")``
  (warnings counted) for plain training, qcb training, and per evaluation.
- ``determinism``: two same-seed trainings, bit-identical weights or not, then with
  ``torch.use_deterministic_algorithms(True)``.
- ``memory``: peak ``torch.cuda.max_memory_allocated`` of an evaluation and of Neural Cleanse (pmoe-paper).

Without a GPU it runs in seconds: the GPU parts say ``skipped``; the CPU parts (determinism, host reads
per step counted by patching the Tensor methods that read the device) run on the CPU; the smoke run also
runs on the CPU unless ``--quick``. Exit code 0 unless ``--strict`` and a part failed.

    python benchmarks/gpu_check.py [--device cuda] [--out gpu_check.json] [--quick] [--strict]
"""

from __future__ import annotations

import os

# cuBLAS needs this before CUDA starts for torch.use_deterministic_algorithms(True) (the determinism part)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
TARGET_EPOCH_S = 3.0
PAPER_IMAGES = 50_000

Part = dict[str, Any]


# --- helpers ----------------------------------------------------------------------------------------------


def bench_cli(*args: str, timeout: float = 240) -> dict[str, Any]:
    """Run ``bench ARGS`` in a subprocess; its exit code and the tail of its output."""
    cmd = [sys.executable, "-c", "from bench.cli import app; app()", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-600:]}")
    return {"exit": proc.returncode}


def smoke(device: str, tmp: Path, name: str, *extra: str, train: dict[str, Any] | None = None) -> dict[str, Any]:
    """``bench run quickstart --smoke`` on ``device`` in a fresh runs folder (``train``: overrides)."""
    scenario = QUICKSTART
    if train:
        raw = yaml.safe_load(QUICKSTART.read_text())
        raw["train"] = {**raw["train"], **train}
        scenario = tmp / f"{name}.yaml"
        scenario.write_text(yaml.safe_dump(raw, sort_keys=False))
    bench_cli("run", str(scenario), "--smoke", "--device", device, "--runs-dir", str(tmp / name / "runs"),
              "--reports-dir", str(tmp / name / "reports"), *extra)
    return {"scenario": "quickstart --smoke", **({"train": train} if train else {}), "args": list(extra)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paper_model(device: torch.device) -> torch.nn.Module:
    from bench.registry import REGISTRY

    return REGISTRY.get("model", "pmoe-paper").create(
        input_shape=(3, 32, 32), num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3
    ).to(device)


def small_model(device: torch.device, seed: int = 0) -> torch.nn.Module:
    from bench.registry import REGISTRY

    torch.manual_seed(seed)
    return REGISTRY.get("model", "pmoe").create(
        input_shape=(1, 16, 16), num_classes=10, mean=(0.5,), std=(0.25,), width=1, experts=4, topk=4
    ).to(device)


def train_cfg(**fields: Any) -> dict[str, Any]:
    from bench.scenario import TrainSpec

    return TrainSpec(**{"epochs": 1, "batch_size": 128, "lr": 0.05, **fields}).model_dump()


def random_set(n: int, shape: tuple[int, ...], device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=gen).to(device), torch.randint(0, 10, (n,), generator=gen).to(device)


@contextlib.contextmanager
def cuda_syncs() -> Iterator[list[str]]:
    """Counts synchronising CUDA operations (``set_sync_debug_mode("warn")`` warnings) inside the block."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        calls: list[str] = []
        try:
            yield calls
        finally:
            torch.cuda.set_sync_debug_mode(0)
            calls.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))


# --- parts ------------------------------------------------------------------------------------------------


def paper_epoch(device: torch.device) -> dict[str, Any]:
    """Seconds per 50k-image epoch of pmoe-paper at batch 128, per setting, against the target."""
    from bench.train import fit

    x, y = random_set(PAPER_IMAGES, (3, 32, 32), device)
    out: dict[str, Any] = {"target_s": TARGET_EPOCH_S, "images": PAPER_IMAGES}
    settings = {
        "fp32": {},
        "bf16+cl": {"precision": "bf16", "channels_last": True},
        "bf16+cl+compile": {"precision": "bf16", "channels_last": True, "compile": True},
    }
    for label, fields in settings.items():
        cfg = train_cfg(**fields)
        fit(paper_model(device), x[:2048], y[:2048], cfg, seed=0, augment="crop_flip")  # warm-up (compiles)
        model = paper_model(device)
        sync(device)
        start = time.perf_counter()
        result = fit(model, x, y, cfg, seed=0, augment="crop_flip")
        sync(device)
        seconds = time.perf_counter() - start
        out[label] = {"epoch_s": round(seconds, 2), "images_per_s": round(PAPER_IMAGES / seconds),
                      "meets_target": seconds <= TARGET_EPOCH_S,
                      **({"compile_frames": result.compile_frames} if fields.get("compile") else {})}
    return out


def host_syncs(device: torch.device) -> dict[str, Any]:
    """Host synchronisations per step (plain and qcb training; 24 steps each on a GPU) and per evaluation."""
    from bench.attacks.badnets import BadNets
    from bench.attacks.qcb import QCBSpec, prepare_qcb
    from bench.data.base import TensorData
    from bench.evaluate import evaluate
    from bench.train import fit

    cuda = device.type == "cuda"
    steps, batch = (24, 128) if cuda else (4, 32)  # a CPU only checks that the part works: keep it small
    x, y = random_set(batch * steps, (1, 16, 16), device)
    from bench.hostreads import host_reads

    counter = cuda_syncs if device.type == "cuda" else host_reads
    out: dict[str, Any] = {"method": "sync_debug warnings" if device.type == "cuda" else "Tensor method calls"}
    model = small_model(device)
    fit(model, x[: 2 * batch], y[: 2 * batch], train_cfg(batch_size=batch), seed=0)  # warm-up (cuDNN)
    with counter() as calls:
        fit(small_model(device), x, y, train_cfg(batch_size=batch), seed=0)
    out["train_per_step"] = round(max(0, len(calls) - 1) / steps, 3)  # one per epoch is the loss
    out["train_total"] = len(calls)
    trigger = BadNets(size=2, position="top-left")
    qmodel = small_model(device)
    training = prepare_qcb(QCBSpec(lambda_fp_trigger=0.5), qmodel, x, y, trigger, 0, 0.1, seed=0)
    try:
        with counter() as calls:
            fit(qmodel, training.x, training.y, train_cfg(batch_size=batch), seed=0, objective=training.objective)
    finally:
        training.finish()
    out["qcb_per_step"] = round(max(0, len(calls) - 1) / steps, 3)
    n_eval, eval_batch = (2048, 256) if cuda else (128, 32)
    data = TensorData("random", x, y, x[:n_eval], y[:n_eval], num_classes=10, mean=(0.5,), std=(0.25,))
    with counter() as calls:
        evaluate(model, data, trigger, 0, batch_size=eval_batch)
    out["evaluation_total"] = len(calls)  # per evaluation (metrics, pairing), none per batch
    out["evaluation_batches"] = -(-n_eval // eval_batch) + -(-int((data.test_y != 0).sum()) // eval_batch)
    return out


def determinism(device: torch.device) -> dict[str, Any]:
    """Two same-seed trainings (crop+flip): bit-identical weights? Then with deterministic algorithms."""
    from bench.train import fit

    n, epochs = (2048, 2) if device.type == "cuda" else (128, 1)
    x, y = random_set(n, (1, 16, 16), device, seed=3)

    def train() -> dict[str, torch.Tensor]:
        model = small_model(device, seed=0)
        fit(model, x, y, train_cfg(epochs=epochs, batch_size=32), seed=0, augment="crop_flip")
        return model.state_dict()

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    out: dict[str, Any] = {"default": same(train(), train())}
    torch.use_deterministic_algorithms(True)
    try:
        out["deterministic_algorithms"] = same(train(), train())
    except RuntimeError as exc:
        out["deterministic_algorithms"] = f"error: {str(exc).splitlines()[0][:200]}"
    finally:
        torch.use_deterministic_algorithms(False)
    return out


def memory(device: torch.device) -> dict[str, Any]:
    """Peak allocated GPU memory (MiB) of an evaluation (10k images, batch 1024) and of Neural Cleanse."""
    from bench.attacks.badnets import BadNets
    from bench.data.base import TensorData
    from bench.defenses.base import DefenseContext
    from bench.defenses.neural_cleanse import NeuralCleanse
    from bench.evaluate import evaluate

    x, y = random_set(10_000, (3, 32, 32), device)
    data = TensorData("random", x[:1000], y[:1000], x, y, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = paper_model(device)
    trigger = BadNets(size=3, position="bottom-right")
    out: dict[str, Any] = {}
    torch.cuda.reset_peak_memory_stats(device)
    evaluate(model, data, trigger, 0, batch_size=1024)
    out["evaluation_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    ctx = DefenseContext(clean_x=x[:500], clean_y=y[:500], train_cfg=train_cfg(), seed=0, num_classes=10,
                         trigger=trigger, target=0)
    torch.cuda.reset_peak_memory_stats(device)
    NeuralCleanse(steps=30, classes=[0, 1, 2]).run(model, ctx)
    out["neural_cleanse_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    out["neural_cleanse"] = "steps=30, classes 0-2, 500 clean images, pmoe-paper"
    return out


# --- driver -----------------------------------------------------------------------------------------------


def run_part(name: str, needs_gpu: bool, fn: Callable[[], dict[str, Any]], skip: str | None) -> Part:
    """Run one part unless ``skip`` says why not; its status, seconds and result or error."""
    if skip:
        return {"part": name, "gpu": needs_gpu, "status": "skipped", "why": skip}
    start = time.perf_counter()
    try:
        result = fn()
        status, detail = "ok", result
    except Exception as exc:  # noqa: BLE001 - a failing part is a finding, the others still run
        status, detail = "failed", {"error": f"{type(exc).__name__}: {str(exc)[:500]}",
                                    "trace": traceback.format_exc(limit=3)[-800:]}
    return {"part": name, "gpu": needs_gpu, "status": status, "seconds": round(time.perf_counter() - start, 1),
            "result": detail}


def check(device_arg: str, quick: bool) -> dict[str, Any]:
    """Every part, on ``device_arg`` (``auto``: CUDA when present); GPU parts skipped without CUDA."""
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    device = torch.device(device_arg if device_arg not in ("auto",) else ("cuda" if cuda else "cpu"))
    no_gpu = None if cuda else "no CUDA device"
    quick_skip = "--quick" if quick else None
    try:
        import ray  # noqa: F401

        no_ray = None
    except ImportError:
        no_ray = "ray is not installed (pip install -e '.[ray]')"
    parts: list[Part] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp_name:
        tmp = Path(tmp_name)
        dev = str(device)
        parts.append(run_part("smoke-fp32", False, lambda: smoke(dev, tmp, "fp32"), quick_skip))
        parts.append(run_part("smoke-bf16-cl-compile", True, lambda: smoke(
            dev, tmp, "bf16", train={"precision": "bf16", "channels_last": True, "compile": True}), no_gpu))
        parts.append(run_part("smoke-workers2", True, lambda: smoke(dev, tmp, "workers", "--workers", "2"), no_gpu))
        parts.append(run_part("smoke-ray", True, lambda: smoke(dev, tmp, "ray", "--executor", "ray"),
                              no_gpu or no_ray))
    parts.append(run_part("paper-epoch", True, lambda: paper_epoch(device), no_gpu))
    parts.append(run_part("host-syncs", False, lambda: host_syncs(device), None))
    parts.append(run_part("determinism", False, lambda: determinism(device), None))
    parts.append(run_part("memory", True, lambda: memory(device), no_gpu))
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "gpu_parts_skipped": [p["part"] for p in parts if p["gpu"] and p["status"] == "skipped"],
        "cpu_parts_ran": [p["part"] for p in parts if not p["gpu"] and p["status"] != "skipped"],
        "failed": [p["part"] for p in parts if p["status"] == "failed"],
        "parts": parts,
    }


def _brief(part: Part) -> str:
    """One line of a part's result for the table."""
    if part["status"] == "skipped":
        return f"skipped: {part['why']}"
    result = part["result"]
    if part["status"] == "failed":
        return result["error"].splitlines()[0][:110]
    flat = []
    for key, value in result.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        flat.append(f"{key}: {value}")
    return "; ".join(flat)


def print_table(summary: dict[str, Any]) -> None:
    """The summary as a plain table on stdout."""
    print(f"gpu_check on {summary['device']} (torch {summary['torch']})")
    print(f"{'part':24s} {'status':8s} {'s':>7s}  result")
    for part in summary["parts"]:
        seconds = f"{part['seconds']:7.1f}" if "seconds" in part else " " * 7
        print(f"{part['part']:24s} {part['status']:8s} {seconds}  {_brief(part)}")
    print(f"GPU parts skipped: {', '.join(summary['gpu_parts_skipped']) or 'none'}; "
          f"CPU parts ran: {', '.join(summary['cpu_parts_ran']) or 'none'}; "
          f"failed: {', '.join(summary['failed']) or 'none'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:1, cpu")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    parser.add_argument("--quick", action="store_true", help="skip the smoke run (the slow part on a CPU)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a part failed")
    args = parser.parse_args()
    summary = check(args.device, args.quick)
    print_table(summary)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2, default=str))
    return 1 if args.strict and summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
