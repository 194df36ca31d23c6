"""torch.compile in the training loop: one compiled graph per architecture, shared by every job of it in
the process, and no recompilation for the last partial batch (Dynamo stops compiling a code object after
``recompile_limit`` versions, silently, for the rest of the process). Backend ``eager``, so it runs fast."""

from __future__ import annotations

import torch
from torch import nn

from bench.attacks.badnets import BadNets
from bench.attacks.qcb import QCBSpec, prepare_qcb
from bench.registry import REGISTRY
from bench.scenario import TrainSpec
from bench.train import fit


def pmoe(experts: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return REGISTRY.get("model", "pmoe").create(
        input_shape=(1, 8, 8), num_classes=10, mean=(0.5,), std=(0.25,), width=1, experts=experts, topk=2
    )


def data(n: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


CFG = TrainSpec(epochs=2, batch_size=32, lr=0.05, compile=True).model_dump()  # 80 = 32 + 32 + 16: partial


def test_second_job_of_an_architecture_does_not_recompile() -> None:
    x, y = data()
    first = fit(pmoe(experts=3), x, y, CFG, seed=0, compile_backend="eager")
    assert first.compile_recompiles == 0  # the partial batch ran uncompiled
    assert first.compile_frames == 1  # one graph for this (new) architecture
    again = fit(pmoe(experts=3, seed=1), x, y, CFG, seed=1, compile_backend="eager")
    assert (again.compile_frames, again.compile_recompiles) == (0, 0)
    other = fit(pmoe(experts=5), x, y, CFG, seed=0, compile_backend="eager")  # its own code object
    assert (other.compile_frames, other.compile_recompiles) == (1, 0)
    assert fit(pmoe(experts=3, seed=2), x, y, CFG, seed=2, compile_backend="eager").compile_frames == 0


def test_compiled_training_matches_eager_training() -> None:
    x, y = data()
    eager, compiled = pmoe(experts=4), pmoe(experts=4)
    a = fit(eager, x, y, {**CFG, "compile": False}, seed=0)
    b = fit(compiled, x, y, CFG, seed=0, compile_backend="eager")
    assert a.compile_frames is None and b.compile_frames is not None
    assert torch.allclose(torch.tensor(a.epoch_losses), torch.tensor(b.epoch_losses), atol=1e-5)


def test_qcb_jobs_compile_apart_from_every_other_model() -> None:
    """qcb: QAT parametrizations give each model layer classes of its own, so a qcb job compiles its own
    versions (per quantized precision and batch shape) on a code object of its own: the second job costs
    what the first did, never more (nothing accumulates towards the recompile limit), and a plain model
    of a compiled architecture still recompiles nothing afterwards."""
    x, y = data(96)
    cfg = {**CFG, "epochs": 1}
    spec = QCBSpec(lambda_fp_trigger=0.5)
    trigger = BadNets(size=2, position="top-left")
    frames = []
    for seed in (0, 1):
        model = pmoe(experts=2, seed=seed)
        training = prepare_qcb(spec, model, x, y, trigger, 0, 0.2, seed=seed)
        try:
            result = fit(model, training.x, training.y, cfg, seed=seed, objective=training.objective,
                         compile_backend="eager")
        finally:
            training.finish()
        frames.append((result.compile_frames, result.compile_recompiles))
    assert frames[0] == frames[1]
    assert frames[0][1] < torch._dynamo.config.recompile_limit - 1
    fit(pmoe(experts=2), x, y, CFG, seed=0, compile_backend="eager")
    assert fit(pmoe(experts=2, seed=1), x, y, CFG, seed=1, compile_backend="eager").compile_frames == 0
