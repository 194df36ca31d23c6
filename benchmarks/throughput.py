"""Training throughput (images/s) of the paper-size and the small pMoE at batch 128 on this device,
with the share of the device's measured dense matmul peak *in the run's precision* (a bf16 matmul peak
for bf16 runs, a TF32 peak when TF32 is on, else fp32; the label says which), and peak memory. Timings
synchronise the device in use (``cuda:1`` is not the default device).

    python benchmarks/throughput.py [--device cpu] [--steps 20] [--precision fp32|bf16|auto] [--channels-last]
        [--compile] [--only paper|small] [--loop] [--tf32] [--defaults]

``--defaults`` measures the training defaults against each other on this device: the old default (fp32,
contiguous memory) against today's (``precision: auto``, ``channels_last: auto``: :mod:`bench.precision`),
alternating the two three times and reporting the best of each and their ratio.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from bench.precision import resolve_channels_last, resolve_precision
from bench.registry import REGISTRY
from bench.train import resolve_device


def peak_label(device: torch.device, precision: str) -> str:
    """Which matmul the yardstick is: ``bf16``, ``tf32`` (fp32 tensors on CUDA with TF32 allowed) or ``fp32``."""
    if precision == "bf16":
        return "bf16"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def matmul_peak_flops(device: torch.device, precision: str = "fp32", n: int = 2048, repeats: int = 5) -> float:
    """Measured dense matmul rate (FLOP/s) of ``device`` in ``precision`` (bf16 operands for bf16 runs; fp32
    operands otherwise, which CUDA runs as TF32 when it is allowed): the yardstick for 'share of peak'."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):  # best of three: the yardstick should not carry one run's noise
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best


def _sync(device: torch.device) -> None:
    """Wait for ``device`` itself (not the default CUDA device)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward+backward, counted by torch's FLOP counter (3x forward for matmul/conv)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure(name: str, params: dict, shape: tuple[int, int, int], device: torch.device, steps: int,
            precision: str, channels_last: bool, compile_model: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    model = REGISTRY.get("model", name).create(
        input_shape=shape, num_classes=10, mean=(0.5,) * shape[0], std=(0.25,) * shape[0], **params
    ).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(128, *shape, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    flops = train_step_flops(model, x)
    step_model = torch.compile(model) if compile_model else model  # as bench.train.fit does
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    warmup = 3
    for i in range(steps + warmup):  # the warm-up steps include torch.compile's compilation
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(step_model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    return {"images_per_s": 128 / seconds, "step_ms": seconds * 1000, "flops_per_s": flops / seconds}


def loop_overhead(name: str, params: dict, shape: tuple[int, int, int], device: torch.device, steps: int,
                  augment: str) -> dict[str, float]:
    """Share of a training step spent outside forward/backward/optimizer: bench.train.fit over ``steps``
    batches (shuffling, augmentation on the device, progress) against the bare steps on one batch."""
    from bench.scenario import TrainSpec
    from bench.train import fit

    cfg = TrainSpec(epochs=1, batch_size=128, lr=0.1).model_dump()
    x = torch.rand(128 * steps, *shape, device=device)
    y = torch.randint(0, 10, (128 * steps,), device=device)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return REGISTRY.get("model", name).create(
            input_shape=shape, num_classes=10, mean=(0.5,) * shape[0], std=(0.25,) * shape[0], **params
        ).to(device)

    fit(model(), x[:256], y[:256], cfg, seed=0, augment=augment)  # warm-up
    _sync(device)
    start = time.perf_counter()
    fit(model(), x, y, cfg, seed=0, augment=augment)
    _sync(device)
    loop = (time.perf_counter() - start) / steps
    bare = measure(name, params, shape, device, steps, "fp32", False)["step_ms"] / 1000
    return {"loop_ms": loop * 1000, "bare_ms": bare * 1000, "overhead": max(0.0, loop - bare) / loop}


CASES = [
    ("pmoe-paper", {}, (3, 32, 32)),
    ("pmoe (quickstart)", {"width": 1, "experts": 4, "topk": 4}, (1, 16, 16)),
]


def compare_defaults(device: torch.device, steps: int, only: str | None) -> None:
    """Images/s of the old default training setting against today's ``auto`` ones, best of 3 alternations."""
    new_precision = resolve_precision("auto", device)
    new_layout = resolve_channels_last("auto", device)
    print(f"device {device}, threads {torch.get_num_threads()}; today's defaults resolve to {new_precision}"
          f"{' + channels_last' if new_layout else ''}")
    cases = CASES if only is None else CASES[:1] if only == "paper" else CASES[1:]
    for label, params, shape in cases:
        name = label.split()[0]
        old = new = 0.0
        for _ in range(3):  # alternated, so a drift of the host's speed hits both alike
            old = max(old, measure(name, params, shape, device, steps, "fp32", False)["images_per_s"])
            new = max(new, measure(name, params, shape, device, steps, new_precision, new_layout)["images_per_s"])
        print(f"{label:20s} batch 128 {shape}: fp32 {old:8.1f} images/s, defaults {new:8.1f} images/s: "
              f"{new / old:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (the train setting)")
    parser.add_argument("--only", choices=["paper", "small"], help="measure one of the two models")
    parser.add_argument("--loop", action="store_true", help="also time the real training loop (bench.train.fit)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls and convolutions (CUDA)")
    parser.add_argument("--defaults", action="store_true",
                        help="the old default (fp32, contiguous) against today's (precision and channels_last auto)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    args.precision = resolve_precision(args.precision, device)
    if args.defaults:
        compare_defaults(device, args.steps, args.only)
        return
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak_kind = peak_label(device, args.precision)
    peak = matmul_peak_flops(device, args.precision)
    print(f"device {device}, threads {torch.get_num_threads()}, measured {peak_kind} matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s")
    cases = CASES
    if args.only:
        cases = cases[:1] if args.only == "paper" else cases[1:]
    for label, params, shape in cases:
        name = label.split()[0]
        r = measure(name, params, shape, device, args.steps, args.precision, args.channels_last, args.compile)
        print(f"{label:20s} batch 128 {shape}: {r['images_per_s']:8.1f} images/s, {r['step_ms']:7.1f} ms/step, "
              f"{r['flops_per_s'] / peak:6.1%} of the {peak_kind} matmul peak")
    for label, params, shape in [c for c in cases if c[0] == "pmoe-paper"] if args.loop else []:
        r = loop_overhead(label.split()[0], params, shape, device, args.steps, "crop_flip")
        print(f"{label:20s} training loop: {r['loop_ms']:7.1f} ms/step vs {r['bare_ms']:7.1f} bare: "
              f"{r['overhead']:5.1%} of a step outside forward/backward/optimizer")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    print(f"peak host memory (max RSS) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
