"""Applying a :class:`QuantConfig` to a model: post-training (PTQ) and quantization-aware training (QAT).

The quantized-backdoor paper (Lin & Hu, 2025) evaluates PTQ (section 4.6: quantize a trained model's
weights with Eq. 2, no retraining) and trains with fake quantization in the forward pass and
full-precision weights in the update (section 4.2.1, Eq. 3-6).

- :func:`quantized` (PTQ): a context manager that overwrites the in-scope weights with Q_B(weights) and puts
  the exact original values back on exit, exception or not. It never trains: no gradient, no optimizer
  state, ``requires_grad`` untouched, so one trained model serves every bit-width and scope.
- :func:`quantize_copy`: a deep copy with quantized weights, for saving or shipping.
- :func:`attach_qat` / :func:`qat` (QAT): ``torch.nn.utils.parametrize`` puts a :class:`FakeQuantize` on
  every in-scope weight, so every forward sees Q_B(theta) while autograd (straight-through) and the
  optimizer act on the fp32 master theta. The parametrization keeps the same ``nn.Parameter`` objects, so an
  optimizer built before or after attaching keeps working; removal leaves the fp32 masters in place.
- :func:`fake_quantized_forward`: one forward with Q_B(theta) without attaching anything (functional call);
  gradients reach theta straight-through.

A quantization-conditioned objective (Eq. 6: L_QAT at B plus lambda * L_BD at B_t, optionally a term at
fp32) needs differently quantized forwards in one step. Either attach QAT once and switch per forward::

    handle = attach_qat(model, QuantConfig(bits=8, scope="gate"))
    loss = ce(model(x), y)                              # Q_8(theta)
    with handle.at_bits(4):
        loss = loss + lam * ce(model(x_t), y_t)         # Q_4(theta)
    with handle.fp32():
        loss = loss + mu * ce(model(x_t), y)            # theta itself
    loss.backward()                                     # d/dtheta of all three; STE through each Q

or, without attaching, ``fake_quantized_forward(model, config_bt, x_t)`` next to a plain ``model(x)``.
Each forward records its own graph, so switching between forwards is exact; no copies of the model are
made. Gradients: a quantized forward gives dL/dtheta = dL/dQ(theta) (identity STE); an fp32 forward gives
the ordinary gradient; the sum of terms gives the sum of gradients.

Activation quantization (``activations=True``): a forward hook on every module that directly owns an
in-scope weight fake-quantizes that module's tensor output(s) at the same bit-width and symmetry, per
tensor, with a dynamic min-max range over the whole batch (no calibration; a sample's grid depends on its
batch, so results depend on how the evaluation batches images). The symmetry follows the weights' setting:
a ``symmetric`` config rounds activations on a symmetric grid too (as TensorRT does), while onnxruntime and
torch-x86 quantize activations to affine uint8 with calibrated static ranges. Keep router kernels in their
own submodule so that "gate activations" means the router scores.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from bench.quant.config import QuantConfig, QuantError, normalize_bits
from bench.quant.fake import check_granularity, fake_quantize
from bench.quant.scopes import scope_parameters


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return model.get_submodule(prefix), leaf


def _in_scope(model: nn.Module, config: QuantConfig) -> list[str]:
    return [] if config.is_fp32 else scope_parameters(model, config.scope)


class ActivationQuantizer:
    """Forward hook: fake-quantize a module's tensor output(s), per tensor, min-max over the batch.

    A plain picklable object, so a model carrying it (see :func:`quantize_copy`) can be ``torch.save``d.
    """

    def __init__(self, bits: int | None, symmetric: bool = False) -> None:
        self.bits = normalize_bits(bits)
        self.symmetric = symmetric
        self.enabled = True

    def _one(self, t: Any) -> Any:
        if isinstance(t, Tensor) and t.is_floating_point():
            return fake_quantize(t, self.bits, "tensor", self.symmetric)
        return t

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if not self.enabled or self.bits is None:
            return None
        if isinstance(output, (tuple, list)):
            return type(output)(self._one(t) for t in output)
        return self._one(output)


def _hook_activations(
    model: nn.Module, names: list[str], config: QuantConfig
) -> tuple[list[ActivationQuantizer], list[RemovableHandle]]:
    if not config.activations or not names:
        return [], []
    owners: dict[int, nn.Module] = {}
    for name in names:
        module, _ = _owner(model, name)
        owners.setdefault(id(module), module)
    quantizers = [ActivationQuantizer(config.bits, config.symmetric) for _ in owners]
    hooks: list[RemovableHandle] = []
    try:
        for module, quantizer in zip(owners.values(), quantizers, strict=True):
            hooks.append(module.register_forward_hook(quantizer))
    except BaseException:
        for hook in hooks:  # none left behind when registration fails part-way
            hook.remove()
        raise
    return quantizers, hooks


def _quantize_in_place(model: nn.Module, names: list[str], config: QuantConfig) -> None:
    with torch.no_grad():
        for name in names:
            p = model.get_parameter(name)
            p.copy_(fake_quantize(p.detach(), config.bits, config.granularity, config.symmetric))


@contextlib.contextmanager
def quantized(model: nn.Module, config: QuantConfig) -> Iterator[nn.Module]:
    """PTQ: inside the block the in-scope weights hold Q_B(weights); on exit the exact originals return.

    Parameters are modified in place (same objects, same storage), so do not backpropagate through a
    graph built before entering. fp32 configs leave the model untouched.
    """
    names = _in_scope(model, config)
    saved: list[tuple[nn.Parameter, Tensor]] = []
    hooks: list[RemovableHandle] = []
    try:
        with torch.no_grad():
            for name in names:
                p = model.get_parameter(name)
                saved.append((p, p.detach().clone()))
                p.copy_(fake_quantize(p.detach(), config.bits, config.granularity, config.symmetric))
        hooks = _hook_activations(model, names, config)[1]
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for p, original in saved:
                p.copy_(original)


def quantize_copy(model: nn.Module, config: QuantConfig) -> nn.Module:
    """A deep copy of ``model`` with its in-scope weights replaced by Q_B(weights); ``model`` is untouched.

    With ``activations=True`` the copy also carries the activation hooks; they survive ``torch.save`` of
    the module but not of its ``state_dict`` (which holds the quantized weights only).
    """
    names = _in_scope(model, config)
    clone = copy.deepcopy(model)
    _quantize_in_place(clone, names, config)
    _hook_activations(clone, names, config)
    return clone


class FakeQuantize(nn.Module):
    """Parametrization ``w -> Q_B(w)`` (Eq. 2, straight-through); ``bits``, ``enabled`` switchable."""

    def __init__(self, bits: int | None, granularity: str = "tensor", symmetric: bool = False) -> None:
        super().__init__()
        check_granularity(granularity)
        self.bits = normalize_bits(bits)
        self.granularity = granularity
        self.symmetric = symmetric
        self.enabled = True

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled or self.bits is None:
            return w
        return fake_quantize(w, self.bits, self.granularity, self.symmetric)

    def extra_repr(self) -> str:
        sym = ", symmetric" if self.symmetric else ""
        return f"bits={self.bits}, granularity={self.granularity}{sym}, enabled={self.enabled}"


def _restore_order(module: nn.Module, order: list[str]) -> None:
    """Put ``module._parameters`` back in ``order``; parametrize re-registers a removed one at the end."""
    current = dict(module._parameters)
    module._parameters.clear()
    module._parameters.update({k: current[k] for k in order if k in current})
    module._parameters.update({k: v for k, v in current.items() if k not in order})


class QATHandle:
    """The QAT parametrizations attached to one model; switch them per forward, then :meth:`remove`."""

    def __init__(
        self,
        model: nn.Module,
        config: QuantConfig,
        names: list[str],
        quantizers: list[FakeQuantize],
        act_quantizers: list[ActivationQuantizer],
        hooks: list[RemovableHandle],
        orders: dict[int, list[str]] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.names = tuple(names)
        self._quantizers = quantizers
        self._act_quantizers = act_quantizers
        self._hooks = hooks
        self._bits = config.bits
        self._enabled = True
        self._attached = True
        # Registration order of each owner's parameters before attaching, so that removal gives back the
        # same named_parameters() order (optimizer state is saved by position).
        self._orders = orders or {}

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def bits(self) -> int | None:
        return self._bits

    @bits.setter
    def bits(self, bits: int | None) -> None:
        self._check_live()
        self._bits = normalize_bits(bits)
        for q in (*self._quantizers, *self._act_quantizers):
            q.bits = self._bits

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, enabled: bool) -> None:
        self._check_live(switching_bits=False)
        self._enabled = bool(enabled)
        for q in (*self._quantizers, *self._act_quantizers):
            q.enabled = self._enabled

    def _check_live(self, switching_bits: bool = True) -> None:
        if not self._attached:
            raise QuantError("this QAT handle was removed; attach again with attach_qat()")
        if switching_bits and not self._quantizers:
            raise QuantError(
                f"this QAT handle quantizes nothing (attached with {self.config.label}); attach with the "
                "target bit-width to switch bit-widths per forward"
            )

    @contextlib.contextmanager
    def fp32(self) -> Iterator[None]:
        """Forwards inside the block use the fp32 master weights (and unquantized activations)."""
        before = self._enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = before

    @contextlib.contextmanager
    def at_bits(self, bits: int | None) -> Iterator[None]:
        """Forwards inside the block quantize at ``bits`` (None or 32: fp32)."""
        before_bits, before_enabled = self._bits, self._enabled
        self.bits = bits
        self.enabled = True
        try:
            yield
        finally:
            self.bits = before_bits
            self.enabled = before_enabled

    def remove(self) -> None:
        """Detach everything; the modules become plain again and hold their fp32 master weights."""
        if not self._attached:
            return
        for hook in self._hooks:
            hook.remove()
        owners: dict[int, nn.Module] = {}
        for name in self.names:
            module, leaf = _owner(self.model, name)
            owners.setdefault(id(module), module)
            if parametrize.is_parametrized(module, leaf):
                parametrize.remove_parametrizations(module, leaf, leave_parametrized=False)
        for key, module in owners.items():
            _restore_order(module, self._orders.get(key, []))
        self._attached = False

    def __enter__(self) -> QATHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach_qat(model: nn.Module, config: QuantConfig) -> QATHandle:
    """Parametrize every in-scope weight with :class:`FakeQuantize`; fp32 configs attach nothing."""
    names = _in_scope(model, config)  # refuses weights that are parametrized already
    quantizers: list[FakeQuantize] = []
    done: list[str] = []
    orders: dict[int, list[str]] = {}
    try:
        for name in names:
            module, leaf = _owner(model, name)
            orders.setdefault(id(module), list(module._parameters))
            fq = FakeQuantize(config.bits, config.granularity, config.symmetric)
            parametrize.register_parametrization(module, leaf, fq)
            quantizers.append(fq)
            done.append(name)
        act_quantizers, hooks = _hook_activations(model, names, config)
    except BaseException:
        QATHandle(model, config, done, quantizers, [], [], orders).remove()
        raise
    return QATHandle(model, config, names, quantizers, act_quantizers, hooks, orders)


@contextlib.contextmanager
def qat(model: nn.Module, config: QuantConfig) -> Iterator[QATHandle]:
    """:func:`attach_qat` for the duration of a block; removed on exit, exception or not."""
    handle = attach_qat(model, config)
    try:
        yield handle
    finally:
        handle.remove()


def fake_quantized_forward(model: nn.Module, config: QuantConfig, x: Tensor) -> Any:
    """``model(x)`` with the in-scope weights replaced by Q_B(weights), straight-through, nothing attached.

    Uses ``torch.func.functional_call``: the model's parameters are not modified, one quantized tensor per
    in-scope weight is made per call, and gradients flow to the fp32 weights as if Q were the identity.
    """
    names = _in_scope(model, config)
    if not names:
        return model(x)
    params = {
        name: fake_quantize(model.get_parameter(name), config.bits, config.granularity, config.symmetric)
        for name in names
    }
    hooks = _hook_activations(model, names, config)[1]
    try:
        return torch.func.functional_call(model, params, (x,))
    finally:
        for hook in hooks:
            hook.remove()
