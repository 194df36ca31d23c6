"""V-MoE (``vmoe``) and its dense ViT baseline (``vit``): token-choice routing with capacity and Batch
Prioritized Routing, the auxiliary loss and its way into training, expert-choice routing, and the model
contract every attack, defense, quantization scope and analysis relies on; then one tiny end-to-end run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from bench.analysis.routing import layer_selection_masks, patch_touch_mask, selection_masks
from bench.attacks.badpatches import BadPatches
from bench.cli import app
from bench.defenses.expert_pruning import expert_silencer, routing_change
from bench.defenses.pruning import channel_scores, prune
from bench.jobs import build_trigger
from bench.models.vit import MoELayer, VisionMoE
from bench.quant import QuantConfig, quantized
from bench.quant.scopes import scope_parameters
from bench.registry import REGISTRY, load_builtins
from bench.train import fit

load_builtins()

SHAPE = (1, 8, 8)
TINY = {"dim": 16, "depth": 2, "heads": 2, "patch": 2, "mlp_ratio": 2.0, "experts": 4, "topk": 2, "moe_every": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def make(name: str = "vmoe", seed: int = 0, **kw) -> VisionMoE:
    params = {**(TINY if name == "vmoe" else {k: TINY[k] for k in ("dim", "depth", "heads", "patch", "mlp_ratio")}),
              **kw}
    torch.manual_seed(seed)
    return REGISTRY.get("model", name).create(input_shape=SHAPE, num_classes=10, mean=(0.5,), std=(0.25,), **params)


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def last_moe(model: VisionMoE) -> MoELayer:
    return model.moe_layers()[-1][1]


def test_shapes_and_routing_contract():
    model = make().eval()
    logits, routing = model.forward_routing(images())
    assert logits.shape == (6, 10) and model.patch_grid == (4, 4) and model.patch_px == (2, 2)
    cap = last_moe(model).capacity(16)
    assert cap == math.ceil(2 * 16 * 1.25 / 4) == 10
    assert routing.indices.shape == routing.gates.shape == routing.valid.shape == (6, 4, cap)
    assert routing.scores.shape == (6, 4, 16) and routing.scores.dtype == torch.float32
    assert len(routing.layers) == 2 and routing.per_layer()[-1].indices is routing.indices
    sel = routing.selection_mask()
    assert sel.shape == (6, 4, 4, 4)
    # padded slots are no selection: the mask holds exactly the valid slots, each token at most k experts
    assert torch.equal(sel.flatten(2).sum(2), routing.kept())
    assert int(sel.sum(1).max()) <= 2
    assert torch.all(routing.gates[~routing.valid] == 0)
    dense = make("vit")
    out, none = dense.forward_routing(images())
    assert out.shape == (6, 10) and none is None and dense.patch_grid is None
    assert dense.parameter_groups() == {"gate": [], "experts": []}


def test_capacity_respected_and_dropped_tokens_counted():
    model = make(capacity_factor=0.5).eval()  # capacity ceil(2*16*0.5/4) = 4 slots per expert
    routing = model.forward_routing(images())[1]
    for (_, layer), r in zip(model.moe_layers(), routing.per_layer(), strict=True):
        cap = layer.capacity(16)
        assert cap == 4 and int(r.kept().max()) <= cap
        # every token makes k choices: kept + dropped = tokens * k per image
        assert torch.equal(r.kept().sum(1) + layer.last_dropped, torch.full((6,), 16 * 2))
    assert int(last_moe(model).last_dropped.sum()) > 0
    roomy = make(capacity_factor=4.0).eval()  # capacity = all 16 tokens: nothing dropped
    r = roomy.forward_routing(images())[1]
    assert int(last_moe(roomy).last_dropped.sum()) == 0 and torch.all(r.kept().sum(1) == 32)
    assert last_moe(roomy).capacity(16) == 16  # capped at the token count (4.0 would give 32 slots)
    assert last_moe(make(capacity_factor=0.01)).capacity(16) == 1  # at least one slot


def _layer(experts: int, topk: int, bpr: bool, cap_factor: float) -> MoELayer:
    return MoELayer(4, 8, experts, topk, cap_factor, "token-choice", bpr, 0.0, "vmoe")


def test_batch_prioritized_routing_keeps_the_most_confident_tokens():
    # 4 tokens all preferring expert 0 (gates 0.6, 0.9, 0.7, 0.8), one slot per expert
    g0 = torch.tensor([0.6, 0.9, 0.7, 0.8])
    probs = torch.stack([g0, 1 - g0], dim=-1)[None]
    tok, gate, valid = _layer(2, 1, True, 0.5)._token_choice(probs, 1)
    assert valid[0, 0, 0] and int(tok[0, 0, 0]) == 1 and float(gate[0, 0, 0]) == pytest.approx(0.9)
    assert not valid[0, 1].any()  # nobody's first choice is expert 1
    tok, _, valid = _layer(2, 1, False, 0.5)._token_choice(probs, 1)
    assert int(tok[0, 0, 0]) == 0  # without BPR: patch order, the first token wins
    # k = 2, two slots per expert: first choices of all tokens are placed before any second choice,
    # so tokens 1 and 3 (the two most confident) fill expert 0 and everyone's second choice fills expert 1
    tok, _, valid = _layer(2, 2, True, 1.0)._token_choice(probs, 2)
    assert tok[0, 0].tolist() == [1, 3] and valid[0, 0].all()
    assert tok[0, 1].tolist() == [1, 3] and valid[0, 1].all()  # second choices in the same priority order
    kept = valid.sum()
    assert int(kept) == 4
    # a first choice beats an earlier token's second choice: token 0 wants e0 then e1, token 1 wants e1 then
    # e0, one slot each; placing token by token would give token 0 both slots
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])[None]
    tok, gate, valid = _layer(2, 2, True, 1.0)._token_choice(probs, 1)
    assert tok[0, :, 0].tolist() == [0, 1] and valid.all()
    assert gate[0, :, 0].tolist() == pytest.approx([0.9, 0.8])


def test_aux_loss_values_on_hand_checkable_routers():
    for aux, expected in (("switch", 1.0), ("vmoe", 0.0)):
        model = make(aux=aux, aux_weight=0.5).eval()
        for _, layer in model.moe_layers():
            torch.nn.init.zeros_(layer.router.weight)  # uniform router: every gate 1/E
        model(images())
        # two MoE layers, each contributing `expected`, weighted by 0.5
        assert float(model.last_aux) == pytest.approx(0.5 * 2 * expected, abs=1e-6)
    # V-MoE form, 2 experts, every token with logits (a, 0): Imp = T (p, 1-p) -> CV^2 = (2p - 1)^2;
    # Load = T (Phi(0), Phi(-a / sigma)) with sigma = 1/2 (no noise drawn) -> CV^2 = ((1/2 - q) / (1/2 + q))^2
    layer = _layer(2, 1, True, 1.0).eval()
    a = 0.7
    logits = torch.tensor([a, 0.0]).expand(1, 5, 2)
    probs = logits.softmax(-1)
    p = float(probs[0, 0, 0])
    q = 0.5 * (1 + math.erf((-a / 0.5) / math.sqrt(2)))
    want = 0.5 * ((2 * p - 1) ** 2 + ((0.5 - q) / (0.5 + q)) ** 2)
    assert float(layer._aux_loss(logits, logits, probs)) == pytest.approx(want, rel=1e-5)
    # per image, then averaged: two images routed in mirror image have the same loss each (a pooled batch: 0)
    two = torch.stack([torch.tensor([a, 0.0]).expand(5, 2), torch.tensor([0.0, a]).expand(5, 2)])
    assert float(layer._aux_loss(two, two, two.softmax(-1))) == pytest.approx(want, rel=1e-5)
    # k = 2 of 3 experts: the load threshold is each token's 2nd largest logit (sigma = 1/3)
    big, small = 0.9, 0.4
    layer3 = MoELayer(4, 8, 3, 2, 1.0, "token-choice", True, 0.0, "vmoe").eval()
    logits = torch.tensor([big, small, 0.0]).expand(1, 5, 3)
    probs = logits.softmax(-1)

    def phi(z: float) -> float:
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    def cv2(v: list[float]) -> float:
        m = sum(v) / len(v)
        return sum((x - m) ** 2 for x in v) / len(v) / m**2

    want3 = 0.5 * (cv2(probs[0, 0].tolist()) + cv2([phi((big - small) * 3), 0.5, phi(-small * 3)]))
    assert float(layer3._aux_loss(logits, logits, probs)) == pytest.approx(want3, rel=1e-5)
    # Switch form, a router that is not uniform: E * sum_e f_e P_e with f_e from the top-1 choices
    switch = MoELayer(4, 8, 2, 1, 1.0, "token-choice", True, 0.0, "switch").eval()
    logits = torch.stack([torch.tensor([a, 0.0])] * 3 + [torch.tensor([0.0, a])])[None]
    probs = logits.softmax(-1)
    top = float(probs[0, 0, 0])
    mean_p0 = (3 * top + (1 - top)) / 4
    want_switch = 2 * (0.75 * mean_p0 + 0.25 * (1 - mean_p0))
    assert float(switch._aux_loss(logits, logits, probs)) == pytest.approx(want_switch, rel=1e-5)


def test_router_noise_only_in_training():
    x = images()
    model = make().train()
    assert last_moe(model).noise == 0.25  # default 1 / experts
    assert not torch.equal(model.forward_routing(x)[1].gates, model.forward_routing(x)[1].gates)
    quiet = make(noise=0.0).train()
    assert torch.equal(quiet.forward_routing(x)[1].gates, quiet.forward_routing(x)[1].gates)
    model.eval()
    assert torch.equal(model.forward_routing(x)[1].gates, model.forward_routing(x)[1].gates)


def test_aux_loss_reaches_the_router_and_the_training_loss():
    from bench.scenario import TrainSpec

    model = make(noise=0.0, aux_weight=1.0)
    model.train()
    model(images())
    aux = model.auxiliary_loss()
    assert aux is not None and model.auxiliary_loss() is None  # the call clears the record
    aux.backward()
    for _, layer in model.moe_layers():
        assert float(layer.router.weight.grad.abs().sum()) > 0  # the gradient of the aux term alone
    model.zero_grad()
    with torch.no_grad():
        model(images())  # no graph, no record
    assert model.auxiliary_loss() is None
    # fit adds it to whatever the objective returns: one batch, so the epoch loss is that step's CE + aux
    seen = []

    def objective(m, x, y):
        ce = F.cross_entropy(m(x), y)
        seen.append(float(ce.detach()))
        return ce

    x, y = images(8), torch.arange(8) % 10
    cfg = TrainSpec(epochs=1, batch_size=8, lr=1e-3).model_dump()
    result = fit(model, x, y, cfg, seed=0, objective=objective)
    assert float(model.last_aux) > 1e-3
    assert result.epoch_losses[0] == pytest.approx(seen[0] + float(model.last_aux), rel=1e-5)


def test_expert_choice_routing():
    model = make(routing="expert-choice").eval()
    routing = model.forward_routing(images())[1]
    cap = last_moe(model).capacity(16)
    assert routing.valid is None and routing.indices.shape == (6, 4, cap)
    sel = routing.selection_mask()
    assert torch.all(sel.flatten(2).sum(2) == cap)  # every expert fills its buffer with distinct tokens
    # each expert's picks are its top-`cap` tokens by gate
    probs = routing.scores.softmax(dim=1)
    assert torch.allclose(routing.gates, probs.topk(cap, dim=2).values)
    assert torch.allclose(probs.gather(2, routing.indices), routing.gates)  # the tokens that have those gates
    model.train()
    model(images())
    assert model.auxiliary_loss() is None


def test_moe_output_is_the_gate_weighted_sum_of_kept_experts():
    model = make(capacity_factor=0.75).eval()  # some tokens dropped, top-2 of 4 experts
    layer = last_moe(model)
    got = {}
    hook = layer.register_forward_hook(
        lambda m, i, o: got.update(x=i[0], y=o[0], tok=o[1], gate=o[2], valid=o[3], scores=o[4]))
    with torch.no_grad():
        model(images())
    hook.remove()
    x, tok, gate, valid = got["x"], got["tok"], got["gate"], got["valid"]
    probs = got["scores"].softmax(1)  # eval: no noise
    assert torch.allclose(gate[valid], probs.gather(2, tok)[valid])  # the raw softmax gate, not renormalised
    want = torch.zeros_like(x)
    with torch.no_grad():
        for b, j, c in valid.nonzero().tolist():
            t = int(tok[b, j, c])
            want[b, t] += gate[b, j, c] * layer.experts[j](x[b, t][None, None])[0, 0]
    torch.testing.assert_close(got["y"], want, rtol=1e-5, atol=1e-6)


def _moe_output(model: VisionMoE, x: torch.Tensor) -> torch.Tensor:
    got = {}
    handle = model.blocks[model.moe_blocks[-1]].mlp.register_forward_hook(lambda _m, _i, o: got.update(y=o[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return got["y"].detach()


@pytest.mark.parametrize("routing_kind", ["token-choice", "expert-choice"])
def test_routing_is_the_forward_s_routing(routing_kind):
    model = make(routing=routing_kind, capacity_factor=0.75).eval()
    x = images()
    before = _moe_output(model, x)
    sel = model.forward_routing(x)[1].selection_mask().flatten(2)  # [N, E, T]
    for expert in range(4):
        changed = copy.deepcopy(model)
        expert_silencer(changed, expert).apply()  # zero fc1 of that expert: it outputs exactly 0
        after = _moe_output(changed, x)
        moved = (after - before).abs().amax(dim=2) > 0  # [N, T]
        assert torch.equal(moved, sel[:, expert]), expert
        routed = after[sel[:, expert]]
        others = sel.clone()
        others[:, expert] = False
        alone = sel[:, expert] & ~others.any(1)
        assert torch.all(after[alone] == 0)  # a token only that expert kept has an MoE output of 0
        assert routed.shape[0] > 0


def test_parameter_groups_partition_and_quantization_scopes():
    model = make()
    groups = model.parameter_groups()
    names = [n for n, _ in model.named_parameters()]
    gate, experts = set(groups["gate"]), set(groups["experts"])
    assert gate == {n for n in names if n.endswith("router.weight")} and len(gate) == 2
    assert experts == {n for n in names if ".experts." in n} and not gate & experts
    assert not any("attn" in n or "patch_embed" in n or n.startswith("head") for n in gate | experts)
    assert set(scope_parameters(model, "gate")) == gate
    assert set(scope_parameters(model, "experts")) == {n for n in experts if n.endswith("weight")}
    whole = set(scope_parameters(model, "whole"))
    assert gate | set(scope_parameters(model, "experts")) < whole
    assert not any("norm" in n for n in whole)  # LayerNorm parameters stay fp32
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for scope, touched in (("gate", gate), ("experts", set(scope_parameters(model, "experts")))):
        with quantized(model, QuantConfig(bits=4, scope=scope)):
            now = dict(model.named_parameters())
            changed = {n for n in names if not torch.equal(now[n], before[n])}
            assert changed == touched, scope
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(Exception, match="gate"):
        scope_parameters(make("vit"), "gate")


@pytest.mark.parametrize("name", ["vmoe", "vit"])
def test_fine_pruning_silences_hidden_units(name):
    model = make(name).eval()
    x = images(12)
    layers = model.prunable_layers()
    assert len(layers) == (4 if name == "vmoe" else 1) and layers[0].channels == 32
    for criterion in ("activation", "raw-output", "magnitude"):
        scores = channel_scores(model, x, criterion)
        assert all(s.shape == (32,) and torch.isfinite(s).all() for s in scores.values())
    # reference: the same units' outgoing weights zeroed (what silence must be equivalent to)
    ref = copy.deepcopy(model)
    masks = prune(model, x, 0.5)
    assert all(len(m.pruned) == 16 for m in masks)
    with torch.no_grad():
        for mask in masks:
            fc2 = ref.get_submodule(mask.name.rpartition(".")[0]).fc2
            fc2.weight[:, mask.pruned] = 0.0
    acts = {}
    hooks = [lay.act.register_forward_hook(lambda _m, _i, o, k=lay.name: acts.update({k: o})) for lay in layers]
    out = model(x)
    for h in hooks:
        h.remove()
    for mask in masks:
        assert torch.all(acts[mask.name][..., mask.pruned] == 0)  # silent after the GELU
    torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-6)


def test_badpatches_trigger_on_the_vmoe_patch_grid():
    model = make()
    attack = {"name": "badnets", "params": {"size": 1, "position": "top-left", "value": 1.0}, "apply": "badpatches"}
    trigger = build_trigger(attack, model)
    assert isinstance(trigger, BadPatches) and tuple(trigger.grid) == model.patch_grid == (4, 4)
    x = torch.zeros(2, *SHAPE)
    stamped = trigger(x)
    # a 1-pixel square in the top-left corner of every 2x2 patch
    assert torch.equal(stamped[0, 0, ::2, ::2], torch.ones(4, 4)) and float(stamped.sum()) == 2 * 16
    assert patch_touch_mask(trigger, SHAPE, model.patch_grid).all()
    change = routing_change(model, images(), trigger(images()))
    assert change.shape == (4,) and torch.all((change >= 0) & (change <= 1))
    with pytest.raises(Exception, match="patch grid"):
        build_trigger(attack, make("vit"))


def test_layer_selection_masks_match_the_model_routing():
    model = make()
    x = images(5)
    per_layer = layer_selection_masks(model, x, batch_size=2)  # batched: 2 + 2 + 1 images
    with torch.no_grad():
        whole = [r.selection_mask() for r in model.eval().forward_routing(x)[1].per_layer()]
    assert len(per_layer) == 2 and all(torch.equal(a, b) for a, b in zip(per_layer, whole, strict=True))
    assert not torch.equal(per_layer[0], per_layer[1])  # two layers, two routings
    assert torch.equal(per_layer[-1], selection_masks(model, x, batch_size=3))


def test_bench_run_and_analyze_end_to_end(tmp_path):
    vmoe = {"name": "vmoe", **TINY, "depth": 2, "experts": 2, "topk": 1}
    vit = {"name": "vit", **{k: TINY[k] for k in ("dim", "depth", "heads", "patch", "mlp_ratio")}}
    scenario = {
        "name": "vmoe-tiny",
        "seeds": [0],
        "device": "cpu",
        "train": {"epochs": 2, "batch_size": 128, "optimizer": "adam", "lr": 0.003},
        "models": [vmoe, vit],
        "datasets": [{"name": "digits", "image_size": 8}],
        "attacks": [{"name": "badnets", "size": 1, "position": "top-left", "value": 1.0, "target": 0,
                     "apply": {"grid": ["image", "badpatches"]}}],
        "poison_rates": [0.1],
        "quantization": {"bits": ["fp32", 4], "scopes": ["gate", "experts", "whole"]},
        "defenses": [{"name": "fine-pruning", "rate": 0.2, "epochs": 1},
                     {"name": "expert-pruning", "source": "oracle", "epochs": 1},
                     {"name": "neural-cleanse", "steps": 2, "batch_size": 8},
                     {"name": "strip", "n": 4, "test_limit": 16}],
    }
    path = tmp_path / "vmoe.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    cli = CliRunner()
    ran = cli.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
                           str(tmp_path / "reports")], catch_exceptions=False)
    assert ran.exit_code == 0, ran.output
    run_dir = tmp_path / "runs" / "vmoe-tiny"
    rows = json.loads(cli.invoke(app, ["report", str(run_dir), "--format", "json"]).stdout)["rows"]
    ran_rows = [r for r in rows if r["status"] == "ok"]
    assert not any(r["failed"] for r in rows)
    vmoe_rows = [r for r in ran_rows if r["model"] == "vmoe"]
    vit_rows = [r for r in ran_rows if r["model"] == "vit"]
    # vmoe: every quantization scope, both attacks, both defenses, routing metrics
    assert {r["quant"] for r in vmoe_rows} == {"fp32", "int4/gate", "int4/experts", "int4/whole"}
    assert {r["attack"] for r in vmoe_rows} == {"clean", "badnets (apply=image)", "badnets (apply=badpatches)"}
    assert {r["defense"].split(" / ")[0] for r in vmoe_rows} == {"-", "fine-pruning", "expert-pruning",
                                                                 "neural-cleanse"}
    attacked = [r for r in vmoe_rows if r["attack"] != "clean"]
    assert all(r["asr_mean"] is not None and r["jaccard_mean"] is not None for r in attacked)
    # vit (dense): the whole-model scope and fine-pruning only; badpatches, gate/experts, expert-pruning n/a
    assert {r["quant"] for r in vit_rows} == {"fp32", "int4/whole"}
    assert {r["attack"] for r in vit_rows} == {"clean", "badnets (apply=image)"}
    assert {r["defense"].split(" / ")[0] for r in vit_rows} == {"-", "fine-pruning", "neural-cleanse"}
    # STRIP filters inputs (a detector: its FRR / FAR / AUROC are in the detection table, for both models)
    meta = json.loads(cli.invoke(app, ["report", str(run_dir), "--format", "json"]).stdout)["meta"]
    strip = [d for d in meta["detections"] if d["defense"].startswith("strip") and d["status"] == "ok"]
    assert {d["model"] for d in strip} == {"vmoe", "vit"}, meta["detections"]
    assert all({"frr", "far"} <= set(d["metrics"]) for d in strip), strip
    assert all(r["jaccard_mean"] is None for r in vit_rows)
    out = tmp_path / "analysis"
    analyzed = cli.invoke(app, ["analyze", str(run_dir), "--model", "vmoe", "--apply", "badpatches", "--out",
                                str(out), "--test-images", "40", "--device", "cpu"], catch_exceptions=False)
    assert analyzed.exit_code == 0, analyzed.output
    names = {p.name for p in out.glob("*.png")}
    # per-MoE-layer token routing over the patch grid (two MoE layers), beside the usual pictures
    assert any(n.endswith("-layers-selection.png") for n in names), names
    assert any(n.endswith("-layers-frequency.png") for n in names), names
    assert any(n.endswith("-selection.png") and "-layers-" not in n for n in names), names
