"""``onnxruntime``: ONNX export, static QDQ quantization, executed by an onnxruntime CPU session.

Flow: ``torch.onnx.export`` (the dynamo exporter, which needs ``onnxscript``; dynamic batch) of the fp32
model, then ``onnxruntime.quantization.quantize_static`` in QDQ format with a :class:`CalibrationDataReader`
over clean training images (MinMax calibration), run by an ``InferenceSession`` on the
``CPUExecutionProvider`` (its graph optimiser fuses DequantizeLinear-Conv/Gemm-QuantizeLinear into
integer ``QLinearConv`` / ``QGemm`` kernels where it can).

What is quantized: the weight-bearing operators only (``op_types_to_quantize = Conv, Gemm, MatMul``), so
TopK, Softmax, the gate scatter and the expert gating multiply stay fp32. Weights int8, per output channel
when the config says ``granularity: channel`` (``per_channel=True``) else per tensor, symmetric (range
-127..127, scale = max|w| / 127: the fake ``sym`` rule) or, with ``symmetric: false``, asymmetric (ORT's
range always includes 0, unlike Eq. 2's pure min-max); activations uint8, per tensor, asymmetric, static,
at the inputs and outputs of every quantized operator; biases int32, BatchNorm fp32. Scope ``whole``: every
Conv/Gemm/MatMul (the router ``moe.router`` and the head ``fc`` included); ``gate`` / ``experts``: only the
nodes whose weight initializer is one of the scope's weights (ONNX initializers keep the parameter names),
passed as ``nodes_to_quantize``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.quant.config import QuantConfig
from bench.quant.scopes import scope_parameters

OP_TYPES = ("Conv", "Gemm", "MatMul")
#: Images per calibration batch fed to onnxruntime.
CALIBRATION_BATCH = 64


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The fp32 model as ONNX at ``path``, input ``x`` with a dynamic batch dimension."""
    with torch.no_grad():
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["x"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    program.save(str(path))


def quantized_nodes(onnx_model: object, weights: set[str] | None) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes to quantize: all (``weights`` None) or those using a weight in it."""
    nodes = [n for n in onnx_model.graph.node if n.op_type in OP_TYPES]  # type: ignore[attr-defined]
    return [n.name for n in nodes if weights is None or any(i in weights for i in n.input)]


class OrtRunner:
    """An onnxruntime session over the quantized QDQ model (kept in memory, see :attr:`onnx_model`)."""

    def __init__(self, session: object, onnx_model: object, seconds: float) -> None:
        self.session = session
        self.onnx_model = onnx_model  # the quantized QDQ ModelProto, for inspection
        self.prepare_seconds = seconds

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        feed = {"x": x.detach().float().cpu().numpy()}
        logits = self.session.run(["logits"], feed)[0]  # type: ignore[attr-defined]
        return torch.from_numpy(np.ascontiguousarray(logits)).to(x.device)


def prepare(model: nn.Module, config: QuantConfig, calib_x: torch.Tensor) -> OrtRunner:
    """Export ``model`` (a CPU copy in eval mode), quantize it statically on ``calib_x``, open a session."""
    import copy

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            data = calib_x.detach().float().cpu().numpy()
            self.batches = iter([{"x": data[i : i + CALIBRATION_BATCH]} for i in range(0, len(data),
                                                                                      CALIBRATION_BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    start = time.perf_counter()
    model = copy.deepcopy(model).cpu().eval()
    weights = None if config.scope == "whole" else set(scope_parameters(model, config.scope))
    with tempfile.TemporaryDirectory(prefix="bench-ort-") as tmp:
        fp32, quant = Path(tmp) / "model.onnx", Path(tmp) / "model.qdq.onnx"
        export_onnx(model, calib_x[:1].float().cpu(), fp32)
        nodes = quantized_nodes(onnx.load(str(fp32)), weights)
        quantize_static(
            str(fp32), str(quant), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(OP_TYPES),
            nodes_to_quantize=nodes, per_channel=config.granularity == "channel",
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            extra_options={"WeightSymmetric": config.symmetric, "ActivationSymmetric": False},
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        onnx_model = onnx.load(str(quant))
        session = ort.InferenceSession(str(quant), options, providers=["CPUExecutionProvider"])
    return OrtRunner(session, onnx_model, time.perf_counter() - start)
