"""One trial: parameters -> scenario variant -> plan -> execute into the run store -> objective values.

A combination of values that the scenario rejects (each range end was checked alone before the search,
but rules across fields, e.g. qcb's ``repair_from_epoch > warmup_epochs``, can still fail) prunes the
trial without training, with the reason in its ``invalid`` user attribute; the search goes on.

Trials execute into ``runs/<name>/`` like ``bench run``: jobs are content-hashed, so a trial whose
parameters (or some of whose jobs: the clean baseline, every evaluation of an already trained model) were
seen before reuses the stored rows and recomputes nothing. The clean baseline is trained once per study.

While the attacked model trains, a probe (``JobContext.model_hook``) measures it after every epoch on a
fixed subset of the test set and reports the intermediate value (see :mod:`bench.search.objectives`;
not during a qcb objective's clean-only warm-up epochs, which say nothing about the attack);
the pruner may then stop the trial (``optuna.TrialPruned``), and the unfinished job is not recorded (a
later trial with the same parameters replays the pruned trial's values instead of training again). The
probe works on a fresh copy of the model built with the random state saved and restored, so training is
bit-identical with and without it: a job's id still says what its result is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from bench.attacks.poison import triggered_test_set
from bench.errors import BenchError, ScenarioError
from bench.evaluate import predict
from bench.execute.local import Reporter, execute
from bench.jobs import JobContext, build_model, build_trigger
from bench.metrics import attack_success_rate
from bench.models.base import BenchModel
from bench.plan import Plan, build
from bench.quant import QuantConfig, quantized
from bench.search.objectives import TrialMetrics, constraints, objective_values, probe_value
from bench.search.paths import format_path
from bench.search.prepare import PreparedSearch
from bench.store import Store

ModelHook = Callable[[BenchModel, dict[str, Any], int, int], None]

#: Seed of the generator that picks the probe's test images (fixed: every trial sees the same ones).
PROBE_SEED = 0
_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


@dataclass
class TrialRunner:
    """The objective function handed to ``study.optimize``: runs one trial, returns its value(s)."""

    prepared: PreparedSearch
    store: Store
    device: torch.device
    ctx: JobContext
    reporter: Reporter | None = None
    on_start: Callable[[int, dict[str, Any]], None] | None = None
    _probe_idx: dict[str, torch.Tensor] = field(default_factory=dict)

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        prep = self.prepared
        values = {p.name: p.suggest(trial) for p in prep.params}
        if self.on_start is not None:
            self.on_start(trial.number, values)
        try:
            resolved = prep.variant(values, f"trial {trial.number}")
        except ScenarioError as exc:  # each range end was checked alone; this combination breaks a rule
            trial.set_user_attr("invalid", str(exc))
            raise optuna.TrialPruned(f"invalid combination of values: {exc}") from None
        plan = build(resolved)
        cells = _attacked_cells(plan, prep.target, prep.asleep)
        trial.set_user_attr("scenario_params", {p.target: values[p.name] for p in prep.params})
        trial.set_user_attr("jobs", {
            "train": cells["fp32"].train_job, "eval_fp32": cells["fp32"].eval_job,
            "clean_eval_fp32": cells["fp32"].clean_eval_job,
            "eval_target": cells[prep.target].eval_job if prep.target else None,
        })
        single = prep.spec.objective != "multi"
        reported = self._replay_pruned(trial) if single else set()
        self.ctx.model_hook = self._probe(trial, reported) if single and prep.spec.probe_size > 0 else None
        try:
            summary = execute(plan, self.store, self.device, self.reporter, ctx=self.ctx)
        finally:
            self.ctx.model_hook = None
        metrics = collect(plan, self.store, prep.target, prep.asleep)
        trial.set_user_attr("metrics", metrics.to_dict())
        trial.set_user_attr("ran_jobs", len(summary.ran))
        trial.set_user_attr("reused_jobs", summary.skipped)
        trial.set_user_attr("seconds", summary.seconds)
        spec = prep.spec
        for name, value in constraints(spec.objective, metrics, spec.tau, spec.epsilon, spec.epsilon_at).items():
            trial.set_constraint(name, value)
        out = objective_values(spec.objective, metrics)
        return out[0] if single else out

    # -- intermediate values ------------------------------------------------------------------------
    def _replay_pruned(self, trial: optuna.Trial) -> set[int]:
        """Report the intermediate values of an earlier pruned trial with the same parameters (training is
        deterministic, so they would be the same; on a GPU, cuDNN's nondeterministic kernels can make a rerun
        differ slightly, so a replay stands in for a rerun rather than repeating it bit for bit) and prune
        without training if the pruner agrees again.
        Returns the epochs reported."""
        for past in trial.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
            if past.params != trial.params or not past.intermediate_values:
                continue
            trial.set_user_attr("replayed_from", past.number)
            for step, value in sorted(past.intermediate_values.items()):
                trial.report(value, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"as trial {past.number} (same parameters) at epoch {step}")
            return set(past.intermediate_values)
        return set()

    def _probe(self, trial: optuna.Trial, reported: set[int]) -> ModelHook:
        spec = self.prepared.spec
        target_cfg = _quant_config(self.prepared) if self.prepared.target else None

        def hook(model: BenchModel, job_spec: dict[str, Any], epoch: int, epochs: int) -> None:
            attack = job_spec.get("attack")
            if attack is None or epoch in reported:
                return  # the clean baseline reports nothing; a replayed epoch was reported already
            if epoch <= int((attack.get("objective") or {}).get("warmup_epochs", 0)):
                return  # a qcb warm-up epoch trains the clean term alone: nothing to judge the attack by
            asr, asr_q = self.probe(model, job_spec, target_cfg)
            value = probe_value(spec.objective, asr, asr_q, spec.tau)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}/{epochs}: intermediate value {value:.3f} pruned")

        return hook

    def probe(
        self, model: BenchModel, job_spec: dict[str, Any], target_cfg: QuantConfig | None
    ) -> tuple[float, float | None]:
        """ASR at fp32 and at ``target_cfg`` of the model in training, on the probe's test images."""
        data = self.ctx.dataset(job_spec["dataset"])
        attack = job_spec["attack"]
        key = repr(sorted(job_spec["dataset"].items()))
        if key not in self._probe_idx:
            gen = torch.Generator().manual_seed(PROBE_SEED)
            order = torch.randperm(len(data.test_y), generator=gen)[: self.prepared.spec.probe_size]
            self._probe_idx[key] = order.to(data.test_y.device)
        idx = self._probe_idx[key]
        train = job_spec["train"]
        batch = int(train.get("eval_batch_size", 1024))
        with torch.random.fork_rng(devices=_rng_devices(self.device)):
            plain = build_model(job_spec["model"], data).to(self.device)
            plain.load_state_dict(fp32_state(model))
            trigger = build_trigger(attack, plain)
            x_t, _ = triggered_test_set(data.test_x[idx], data.test_y[idx], trigger, attack["target"])
            def asr_now() -> float:
                return attack_success_rate(predict(plain, x_t, batch, train["precision"]), attack["target"])

            asr, asr_q = asr_now(), None
            if target_cfg is not None:
                with quantized(plain, target_cfg):
                    asr_q = asr_now()
        return asr, asr_q


def fp32_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with QAT parametrizations undone: ``x.parametrizations.w.original`` -> ``x.w``
    (the fp32 master weights, what the trained model will hold once QAT is removed)."""
    return {_PARAMETRIZED.sub(r"\1\2", k): v.detach() for k, v in model.state_dict().items()}


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def _quant_config(prepared: PreparedSearch) -> QuantConfig:
    quant = next(q for q in prepared.resolved.quant if q["label"] == prepared.target)
    return QuantConfig.from_dict({k: v for k, v in quant.items() if k != "label"})


def _attacked_cells(plan: Plan, target: str | None, asleep: tuple[str, ...] = ()) -> dict[str, Any]:
    attacked = [c for c in plan.cells if c.attack is not None and c.defense is None and c.quant]
    cells = {c.quant["label"]: c for c in attacked}
    for label in ("fp32", target, *asleep):
        if label is not None and label not in cells:
            raise BenchError(f"{plan.name}: the plan has no attacked cell evaluated at {label}")
    return cells


def collect(plan: Plan, store: Store, target: str | None, asleep: tuple[str, ...] = ()) -> TrialMetrics:
    """The trial's metrics from the stored evaluations of its plan."""
    cells = _attacked_cells(plan, target, asleep)
    fp32 = cells["fp32"]
    ids = [fp32.eval_job, fp32.clean_eval_job] + ([cells[target].eval_job] if target else [])
    ids += [cells[label].eval_job for label in asleep]
    records = store.records(ids)
    missing = [i for i in ids if i not in records]
    if missing:
        raise BenchError(f"{store.root}: evaluations {missing} are not in the store after the trial ran")
    attacked, clean = records[fp32.eval_job].metrics, records[fp32.clean_eval_job].metrics
    asr_q = ba_q = None
    if target is not None:
        at = records[cells[target].eval_job].metrics
        if "not_applicable" in at:
            raise BenchError(f"{plan.name}: search.target_quant: {target}: {at['not_applicable']}")
        asr_q, ba_q = at["asr"], at["ba"]
    asleep_asrs, asleep_bas = [], []
    for label in asleep:
        metrics = records[cells[label].eval_job].metrics
        if "asr" not in metrics:
            why = metrics.get("not_applicable", "no ASR stored")
            raise BenchError(f"{plan.name}: search.asleep_quant: {label}: {why}")
        asleep_asrs.append(metrics["asr"])
        asleep_bas.append(metrics["ba"])
    return TrialMetrics(ba=attacked["ba"], asr=attacked["asr"], ba_clean=clean["ba"], asr_q=asr_q, ba_q=ba_q,
                        asr_asleep=max(asleep_asrs, default=None), ba_asleep=min(asleep_bas, default=None))


def param_assignment(prepared: PreparedSearch, params: dict[str, Any]) -> dict[str, Any]:
    """Optuna parameter names -> scenario paths (``strength`` resolved)."""
    by_name = {p.name: p for p in prepared.params}
    return {format_path(by_name[k].keys): v for k, v in params.items() if k in by_name}
