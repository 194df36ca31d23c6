"""What to quantize and how: one frozen, hashable :class:`QuantConfig` per evaluated precision.

The fields follow the quantized-backdoor paper (Lin & Hu, 2025, section 4.6): integer min-max quantization
(Eq. 2) at B bits, applied to one scope (gate, experts, whole model). Granularity and symmetry are options
because real deploy tool-chains differ from the paper's per-tensor asymmetric default, and a dormant
backdoor may or may not survive the change.

fp32 (``bits=None``, or ``32``) quantizes nothing, so every fp32 config is canonicalised to
``QuantConfig()``: equal, same hash, same label, whatever scope it was written with. That lets a planner
deduplicate ``bits x scope`` grids without special cases.

``backend`` picks who computes the quantized numbers: ``fake`` (Eq. 2 in fp32, the default) or a real integer
back-end (:mod:`bench.quant.backends`). A real back-end's fixed settings replace the fields it cannot change,
so its label names what actually runs (``int8/whole/channel/sym/act@torch-x86``), and ``calibration`` (how
many clean training images calibrate it) is part of its config. For ``fake`` both are left out of
:meth:`QuantConfig.to_dict`, so specs (and job ids) of fake configs are what they were before back-ends.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bench.errors import BenchError
from bench.quant.backends.base import canonical_fields

MIN_BITS = 2
MAX_BITS = 16
FP32_BITS = 32

Scope = Literal["gate", "experts", "whole"]
Granularity = Literal["tensor", "channel"]
BackendName = Literal["fake", "torch-x86", "onnxruntime", "torchao"]
DEFAULT_CALIBRATION = 256


class QuantError(BenchError):
    """A quantization setting that cannot be applied (bad bit-width, scope the model lacks, ...)."""


def normalize_bits(bits: int | None, where: str = "bits") -> int | None:
    """``bits`` as used internally: an int in ``MIN_BITS..MAX_BITS``, or None for fp32 (``None`` or 32)."""
    if bits is None or (isinstance(bits, int) and not isinstance(bits, bool) and bits == FP32_BITS):
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QuantError(
            f"{where}: must be an integer in {MIN_BITS}..{MAX_BITS}, or {FP32_BITS} / null for fp32, "
            f"got {bits!r}"
        )
    return bits


class QuantConfig(BaseModel):
    """One quantization setting.

    bits:        bit-width B of Eq. 2; None (or 32) means fp32, i.e. nothing is quantized.
    scope:       "gate" (router kernels), "experts" (expert weights) or "whole" (every weight).
    granularity: "tensor" (one range per tensor, the paper) or "channel" (one per output channel, dim 0).
    symmetric:   False: asymmetric min-max (the paper); True: narrow-range symmetric, zero exact.
    activations: also fake-quantize the outputs of the modules that own in-scope weights (dynamic,
                 per tensor, per batch, with this config's bits and symmetry); see :mod:`bench.quant.apply`.
    backend:     "fake" (Eq. 2 in fp32) or a real integer back-end of :mod:`bench.quant.backends`.
    calibration: clean training images that calibrate a real back-end (ignored, and dropped, for fake).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int | None = None
    scope: Scope = "whole"
    granularity: Granularity = "tensor"
    symmetric: bool = False
    activations: bool = False
    backend: BackendName = "fake"
    calibration: int = Field(DEFAULT_CALIBRATION, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _canonical_fp32(cls, data: Any) -> Any:
        # Validate the other fields as if quantizing (typos still fail), then drop them: fp32 is fp32.
        if (
            isinstance(data, dict)
            and data.get("bits") in (None, FP32_BITS)
            and not isinstance(data.get("bits"), bool)
        ):
            cls.model_validate({**data, "bits": MIN_BITS})
            return {"bits": None}
        if isinstance(data, dict):
            if data.get("backend", "fake") == "fake":  # calibration means nothing to fake quantization
                cls.model_validate({**data, "backend": "torchao", "bits": 8, "scope": "whole"})
                return {k: v for k, v in data.items() if k != "calibration"}
            return canonical_fields(data)
        return data

    @field_validator("bits", mode="before")
    @classmethod
    def _check_bits(cls, value: Any) -> int | None:
        try:
            return normalize_bits(value)
        except QuantError as exc:
            raise ValueError(str(exc).removeprefix("bits: ")) from None

    @property
    def is_fp32(self) -> bool:
        return self.bits is None

    @property
    def label(self) -> str:
        """Short name for tables: ``fp32``, ``int4/whole``, ``int4/gate/channel/sym/act``, and for a real
        back-end ``@<backend>`` appended (``int8/whole/channel/sym/act@torch-x86``)."""
        if self.bits is None:
            return "fp32"
        parts = [f"int{self.bits}", self.scope]
        if self.granularity == "channel":
            parts.append("channel")
        if self.symmetric:
            parts.append("sym")
        if self.activations:
            parts.append("act")
        label = "/".join(parts)
        return label if self.backend == "fake" else f"{label}@{self.backend}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``from_dict(to_dict())`` round-trips. ``backend`` and ``calibration`` are
        left out for fake configs (their dicts, hence job ids, are those of before back-ends existed)."""
        if self.backend == "fake":
            return self.model_dump(exclude={"backend", "calibration"})
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "quant") -> QuantConfig:
        """Build from a plain dict; errors become a :class:`QuantError` naming ``where.field``."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                path = f"{where}.{loc}" if loc else where
                if err["type"] == "extra_forbidden":
                    allowed = ", ".join(cls.model_fields)
                    lines.append(f"{path}: unknown field; allowed: {allowed}")
                else:
                    lines.append(f"{path}: {err['msg']}, got {err.get('input')!r}")
            raise QuantError("; ".join(lines)) from None

    def __str__(self) -> str:
        return self.label
