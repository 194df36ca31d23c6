"""The quantization audit (bench.defenses.quant_audit): it flags the tiny digits qcb (dormant) model and
not the clean one, reads clean data only, skips scopes a model lacks, and checks its parameters."""

from __future__ import annotations

import pytest
import torch

from bench.data.base import TensorData
from bench.defenses import DefenseContext, QuantAudit
from bench.defenses.quant_audit import drift
from bench.errors import ComponentParamsError
from bench.models.base import BenchModel
from bench.registry import REGISTRY
from bench.train import fit
from tests.test_efrap import build, ctx_for, dormant  # noqa: F401  (the module-scoped qcb model fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
CHEAP = {"bits": [8, 4], "granularity": ["tensor"], "reverse_steps": 20, "reverse_batch": 8, "classes": [0, 1, 2]}


@pytest.fixture(scope="module")
def clean(digits8: TensorData) -> BenchModel:
    model = build(digits8)
    cfg = {"epochs": 6, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0,
           "schedule": "cosine"}
    fit(model, digits8.train_x, digits8.train_y, cfg, seed=1)
    return model.eval()


def test_drift_counts_flips_into_one_class() -> None:
    before = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 1])
    after = torch.tensor([0, 0, 0, 4, 5, 6, 7, 8, 2, 1])
    assert drift(before, after, 10) == {"flip": pytest.approx(0.4), "directed": 0.3, "into": 0}
    assert drift(before, before, 10) == {"flip": 0.0, "directed": 0.0, "into": -1}


def test_audit_flags_the_dormant_model_and_not_the_clean_one(dormant: BenchModel, clean: BenchModel,  # noqa: F811
                                                             digits8: TensorData) -> None:
    ctx = ctx_for(digits8, 180)
    (flagged,) = QuantAudit(**CHEAP).run(dormant, ctx)
    (passed,) = QuantAudit(**CHEAP).run(clean, ctx)
    assert flagged.name == passed.name == "audited" and flagged.state is None and passed.state is None
    assert flagged.metrics["flagged"] == 1 and passed.metrics["flagged"] == 0, (flagged.metrics, passed.metrics)
    assert flagged.metrics["worst_config"].startswith("int4/") and flagged.metrics["into_class"] == 0
    assert flagged.metrics["flip_int4_whole"] > passed.metrics["flip_int4_whole"]
    assert flagged.metrics["flip_int8_whole"] < 0.02  # asleep at 8 bits
    assert {"norm_fp32", "ratio_int4_whole", "norm_int4_gate"} <= set(flagged.metrics)
    assert "correct_class" not in flagged.metrics  # the benchmark did not say which attack: no labelled metric


def test_audit_skips_scopes_a_dense_model_lacks(digits8: TensorData) -> None:
    torch.manual_seed(0)
    dense = REGISTRY.get("model", "dense").create(input_shape=digits8.input_shape, num_classes=10,
                                                  mean=digits8.mean, std=digits8.std, width=1).eval()
    ctx = DefenseContext(clean_x=digits8.train_x[:32], clean_y=digits8.train_y[:32], train_cfg={}, seed=0,
                         num_classes=10)
    (stage,) = QuantAudit(bits=[4], reverse_steps=0).run(dense, ctx)
    assert stage.metrics["skipped_scopes"] == "gate,experts" and stage.metrics["configs"] == 2
    assert "norm_fp32" not in stage.metrics


@pytest.mark.parametrize(("params", "message"), [
    ({"bits": [32]}, "quant-audit.bits"), ({"bits": []}, "quant-audit.bits"), ({"scopes": ["all"]}, "scope"),
    ({"reverse_bits": 6, "bits": [8, 4]}, "reverse_bits"), ({"drift_threshold": 0.0}, "drift_threshold"),
    ({"ratio_threshold": 1.0}, "ratio_threshold"), ({"reverse_steps": -1}, "reverse_steps"),
])
def test_parameters_are_checked(params: dict, message: str) -> None:
    with pytest.raises(ComponentParamsError, match=message):
        QuantAudit(**params)
