"""Which parameters a quantization scope touches: gate, experts, or the whole model.

The quantized-backdoor paper (Lin & Hu, 2025, section 4.2.1, Eq. 5) quantizes the router kernels w_s
("gate"), the expert weights {w_{r,s}, a_{r,s}} ("experts"), or every weight ("whole"). It names weights
only. We follow the deploy tool-chains (TensorRT, TFLite, PyTorch's fbgemm/qnnpack backends) on what a
*weight* is:

- quantized: every kernel -- conv and linear weights, raw ``nn.Parameter`` kernels such as a router
  matrix, embeddings;
- kept in full precision: biases (deployed as int32 accumulators or fp32) and normalisation parameters
  (BatchNorm, GroupNorm, LayerNorm, ... affine weights and biases). A deploy tool-chain folds BatchNorm into
  the preceding convolution before quantizing; we do not fold, we quantize the kernel as trained and keep
  BatchNorm in fp32, as the paper's fake quantization does.

The same rule filters ``gate`` and ``experts``, so ``whole`` is always a superset of both.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from bench.quant.config import QuantError, Scope

SCOPES: tuple[str, ...] = ("gate", "experts", "whole")

_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
        nn.GroupNorm,
        nn.LayerNorm,
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)


def _split(name: str) -> tuple[str, str]:
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


def is_weight(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` counts as a weight (quantized) rather than a bias or a norm parameter."""
    prefix, leaf = _split(name)
    if leaf == "bias":
        return False
    return not isinstance(model.get_submodule(prefix), _NORM_TYPES)


def _check_known(model: nn.Module, names: list[str], group: str, params: dict[str, nn.Parameter]) -> None:
    for name in names:
        if name in params:
            continue
        prefix, leaf = _split(name)
        original = f"{prefix + '.' if prefix else ''}parametrizations.{leaf}.original"
        if original in params:
            raise QuantError(
                f"parameter '{name}' is parametrized (QAT attached?); remove the parametrization "
                "(QATHandle.remove()) before quantizing"
            )
        raise QuantError(
            f"{type(model).__name__}.parameter_groups()['{group}'] names '{name}', which is not a "
            "parameter of the model"
        )


def _check_unparametrized(model: nn.Module) -> None:
    for mname, module in model.named_modules():
        if parametrize.is_parametrized(module):
            raise QuantError(
                f"module '{mname or type(model).__name__}' is parametrized (QAT attached?); remove the "
                "parametrization (QATHandle.remove()) before quantizing"
            )


def scope_parameters(model: nn.Module, scope: Scope | str) -> list[str]:
    """Qualified names of the parameters quantized under ``scope``, in ``named_parameters()`` order."""
    if scope not in SCOPES:
        raise QuantError(f"scope: must be one of {', '.join(SCOPES)}, got {scope!r}")
    params = dict(model.named_parameters())
    if scope == "whole":
        _check_unparametrized(model)
        return [name for name in params if is_weight(model, name)]
    groups_fn = getattr(model, "parameter_groups", None)
    group = list(groups_fn().get(scope, [])) if callable(groups_fn) else []
    if not group:
        raise QuantError(
            f"scope: '{scope}' needs a Mixture-of-Experts model whose parameter_groups() names its "
            f"{scope} parameters; {type(model).__name__} has none. Use scope 'whole' for dense models"
        )
    _check_known(model, group, scope, params)
    wanted = {name for name in group if is_weight(model, name)}
    if not wanted:
        raise QuantError(
            f"scope: '{scope}' of {type(model).__name__} holds only biases or normalisation parameters "
            f"({', '.join(group)}), which are kept in full precision; nothing would be quantized"
        )
    return [name for name in params if name in wanted]
