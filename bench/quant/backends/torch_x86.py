"""``torch-x86``: PyTorch's int8 post-training quantization for x86 CPUs (PT2E), lowered by inductor.

Flow (the one PyTorch recommends for x86 in torch 2.x): ``torch.export`` of the model at a fixed batch size,
``prepare_pt2e`` with torchao's ``X86InductorQuantizer`` and its default config, calibration on clean
training images, ``convert_pt2e``, then ``torch.compile`` (inductor, ``freezing=True``), whose
quantization passes fuse every dequantize-conv/linear-quantize pattern into oneDNN int8 kernels
(``onednn.qconv_pointwise`` / ``qconv2d_pointwise.binary`` / ``qlinear_pointwise``).

What is quantized: the default config is int8 weights, **per output channel, symmetric** (range -128..127,
scale = max|w| / 127.5), and uint8 activations, **per tensor, affine, static** (min-max observed on the
calibration images) at the input of every quantized operator; biases and BatchNorm stay fp32. With scope
``whole`` the quantizer is global: every Conv2d and Linear (stem, WRN blocks, embed, the router
``moe.router``, each ``moe.experts.<e>.conv``, the head ``fc``), with conv+ReLU/add fusions. With scope
``gate`` / ``experts`` only the modules that own the scope's weights get the config
(``set_module_name_qconfig``): the router conv, or the experts' convs. The router's scores come out of an
int8 conv and are dequantized to fp32 before top-k and softmax, which run in fp32.

Verification that int8 kernels run: :attr:`X86Runner.lowered` counts the inductor pattern-matcher hits
``qconv*_lower`` / ``qlinear*_lower`` (``torch._dynamo.utils.counters["inductor"]``) of this compilation;
the tests also read the generated code for ``qconv`` / ``qlinear`` calls.

Two workarounds, both on the exported graph before annotation: the router runs under
``torch.autocast(enabled=False)`` (a no-op in fp32 evaluation), which export wraps in a
``wrap_with_autocast`` higher-order op that the quantizer cannot see into, so it is inlined; and a ReLU
module called twice (a WRN block reuses its ``relu``) would form one partition with two outputs, which the
quantizer refuses, so each ReLU call gets its own partition. The batch size is fixed at export
(:data:`BATCH`): inductor's int8 conv with a dynamic batch fails a stride check, so shorter batches are
padded. Cost on 2 shared cores: about 30-70 s to export, calibrate and compile the tiny pMoE once.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from bench.quant.backends.base import scope_modules
from bench.quant.config import QuantConfig

#: Batch size the model is exported and compiled at (inputs are chunked / padded to it).
BATCH = 256

_LOWERINGS = ("qconv_unary_lower_count", "qconv2d_binary_lower_count", "qlinear_unary_lower_count",
              "qlinear_binary_lower_count")


def _inline_disabled_autocast(gm: torch.fx.GraphModule) -> None:
    """Replace every ``wrap_with_autocast(enabled=False)`` node by the body of its submodule."""
    from torch._higher_order_ops.wrap import WrapWithAutocast

    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, WrapWithAutocast) or node.args[2]:
            continue
        body = getattr(gm, node.args[4].target)
        placeholders = [p for p in body.graph.nodes if p.op == "placeholder"]
        with gm.graph.inserting_before(node):
            outputs = gm.graph.graph_copy(body.graph, dict(zip(placeholders, node.args[5:], strict=True)))
        for user in list(node.users):  # getitem(node, i)
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _one_partition_per_relu(gm: torch.fx.GraphModule) -> None:
    """Give every ReLU call its own source partition (a reused ReLU module would otherwise be one)."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        fqn, cls = list(stack.values())[-1]
        if cls is nn.ReLU or cls == "torch.nn.modules.activation.ReLU":
            node.meta["source_fn_stack"] = [(f"{fqn}:{node.name}", nn.ReLU)]


def _quantizer(model: nn.Module, config: QuantConfig) -> object:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    qconfig = xiq.get_default_x86_inductor_quantization_config()
    if config.scope == "whole":
        quantizer.set_global(qconfig)
    else:
        for name in scope_modules(model, config.scope):
            quantizer.set_module_name_qconfig(name, qconfig)
    return quantizer


class X86Runner:
    """The compiled int8 program; pads / chunks inputs to :data:`BATCH`."""

    def __init__(self, compiled: nn.Module, lowered: dict[str, int], seconds: float) -> None:
        self.compiled = compiled
        self.lowered = lowered  # int8 oneDNN lowerings of this compilation, by pattern
        self.prepare_seconds = seconds

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for begin in range(0, len(x), BATCH):
            xb = x[begin : begin + BATCH].float().cpu()
            n = len(xb)
            out.append(self.compiled(_pad(xb))[:n])
        return torch.cat(out).to(x.device)


def prepare(model: nn.Module, config: QuantConfig, calib_x: torch.Tensor) -> X86Runner:
    """Export, quantize (calibrating on ``calib_x``), convert and compile a copy of ``model`` (eval mode)."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    start = time.perf_counter()
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    example = torch.zeros(BATCH, *calib_x.shape[1:])
    with torch.no_grad():
        gm = torch.export.export(model, (example,)).module()
    _inline_disabled_autocast(gm)
    _one_partition_per_relu(gm)
    prepared = prepare_pt2e(gm, _quantizer(model, config))
    calib = calib_x.float().cpu()
    with torch.no_grad():
        for begin in range(0, len(calib), BATCH):
            prepared(_pad(calib[begin : begin + BATCH]))
    converted = convert_pt2e(prepared)
    before = {k: counters["inductor"][k] for k in _LOWERINGS}
    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(converted)
        compiled(example)  # compile now, so the cost is counted here and the counters are read
    lowered = {k: counters["inductor"][k] - before[k] for k in _LOWERINGS}
    return X86Runner(compiled, lowered, time.perf_counter() - start)


def _pad(x: torch.Tensor) -> torch.Tensor:
    """``x`` filled up to :data:`BATCH` rows with copies of its first (eval mode: rows do not interact)."""
    return x if len(x) == BATCH else torch.cat([x, x[:1].expand(BATCH - len(x), *x.shape[1:])])

