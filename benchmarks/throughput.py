"""Training throughput (images/s) of the paper-size and the small pMoE at batch 128 on this device,
with the share of the device's measured dense matmul peak, and peak memory.

    python benchmarks/throughput.py [--device cpu] [--steps 20] [--precision fp32|bf16] [--channels-last]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from bench.registry import REGISTRY
from bench.train import resolve_device


def matmul_peak_flops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Measured dense fp32 matmul rate (FLOP/s) of ``device``: the yardstick for 'share of peak'."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward+backward, counted by torch's FLOP counter (3x forward for matmul/conv)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure(name: str, params: dict, shape: tuple[int, int, int], device: torch.device, steps: int,
            precision: str, channels_last: bool) -> dict[str, float]:
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
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for i in range(steps + 3):
        if i == 3:
            _sync(device)
            start = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    return {"images_per_s": 128 / seconds, "step_ms": seconds * 1000, "flops_per_s": flops / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    peak = matmul_peak_flops(device)
    print(f"device {device}, threads {torch.get_num_threads()}, measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    cases = [
        ("pmoe-paper", {}, (3, 32, 32)),
        ("pmoe (quickstart)", {"width": 1, "experts": 4, "topk": 4}, (1, 16, 16)),
    ]
    for label, params, shape in cases:
        name = label.split()[0]
        r = measure(name, params, shape, device, args.steps, args.precision, args.channels_last)
        print(f"{label:20s} batch 128 {shape}: {r['images_per_s']:8.1f} images/s, {r['step_ms']:7.1f} ms/step, "
              f"{r['flops_per_s'] / peak:6.1%} of matmul peak")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"peak host memory (max RSS) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
