"""mSFT: roll out the active mixture for C epochs, find the task that peaked earliest, exclude it
and roll back to its peak; repeat until no task is active (arXiv 2603.21606, MISSION.md).

The controller drives the trainer (train_until, evaluate, capture, restore); the decisions are pure
functions of the roll-out's per-task costs, so they are tested without training.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from msft_fast.config import max_trained_epochs
from msft_fast.errors import ConfigError, on_every_rank
from msft_fast.state.history import History
from msft_fast.methods.ledger import StageLedger
from msft_fast.methods.metric import Metric
from msft_fast.methods.records import Evaluation, announce, eval_points, evaluate
from msft_fast.methods.sft import final_record
from msft_fast.report import STOP_TEXT, PeriodicReport, format_flops
from msft_fast.state.snapshot import Snapshot, local_world_size, plan_pool
from msft_fast.training.trainer import Trainer


@dataclass
class Decision:
    excluded: Optional[str]  # None: nothing peaked before the roll-out's last evaluation
    peak_index: Optional[int]  # the roll-out evaluation to roll back to
    peaks: dict[str, int]  # every active task's best evaluation (index into the roll-out)


def task_peaks(costs: list[dict[str, float]], active: list[str], ties: str = "latest") -> dict[str, int]:
    """Index of each task's lowest cost. On equal costs (msft.peak_ties) the latest evaluation that
    reaches the best counts ("latest": a curve that stays flat, say exact match stuck at 0, has not
    peaked), or the earliest ("earliest": the paper's raw argmax)."""
    sign = -1 if ties == "latest" else 1
    return {k: min(range(len(costs)), key=lambda i: (costs[i][k], sign * i)) for k in active}


def effective_peaks(costs: list[dict[str, float]], active: list[str], min_delta: float = 0.0,
                    ties: str = "latest") -> dict[str, int]:
    """Each task's peak as the decisions count it (msft.min_delta): its best evaluation
    (`task_peaks`), unless its latest cost is worse than that best by no more than `min_delta`;
    then the task counts as still improving and its peak is the latest evaluation. A flat but
    jittery curve (a small validation set) then no longer excludes its task on an early jitter."""
    peaks = task_peaks(costs, active, ties)
    if min_delta <= 0:
        return peaks
    last = len(costs) - 1
    return {k: p if costs[last][k] - costs[p][k] > min_delta else last for k, p in peaks.items()}


def choose_exclusion(costs: list[dict[str, float]], active: list[str], tie_break: str,
                     min_delta: float = 0.0, ties: str = "latest") -> Decision:
    """costs[i][task]: cost (lower is better) at roll-out evaluation i (0 = the stage start).

    The active task whose peak (`effective_peaks`) comes first is excluded, unless that is the last
    evaluation (no task overfit within the budget). Several tasks peaking at that same evaluation:
    `most_overfit` takes the one whose cost rose most from its peak to the roll-out's end (ties, and
    `first`, by the order of data.tasks).
    """
    peaks = effective_peaks(costs, active, min_delta, ties)
    earliest = min(peaks.values())
    if earliest == len(costs) - 1:
        return Decision(None, None, peaks)
    tied = [k for k in active if peaks[k] == earliest]
    if tie_break == "most_overfit":
        rise = {k: costs[-1][k] - costs[earliest][k] for k in tied}
        tied.sort(key=lambda k: -rise[k])  # stable: config order breaks equal rises
    return Decision(tied[0], earliest, peaks)


def peak_confirmed(costs: list[dict[str, float]], active: list[str], patience: int,
                   min_delta: float = 0.0, ties: str = "latest") -> bool:
    """The earliest peak has held for `patience` evaluations: a task's best can only move later,
    so the task peaking first now is the one to exclude unless it improves again."""
    earliest = min(effective_peaks(costs, active, min_delta, ties).values())
    return len(costs) - 1 - earliest >= patience


@dataclass
class MsftState:
    """Everything the controller knows; checkpointed (snapshots by reference) so a run resumes mid-roll-out."""

    active: list[str]
    start: Evaluation  # the evaluation the current stage starts from
    start_state: Optional[Snapshot]  # between stages; during a roll-out it is held[0]
    best: Evaluation  # best pooled evaluation over all stages
    best_state: Snapshot
    ledger: dict
    stage: int = 0
    rollout: list[Evaluation] = field(default_factory=list)  # this stage's evaluations; [] before it begins
    held: dict[int, Snapshot] = field(default_factory=dict)  # roll-out index -> state, while some task needs it
    begin: float = 0.0  # epoch position at the stage start
    next_target: int = 0  # index into the stage's evaluation points
    length: float = 0.0  # this roll-out's epochs: msft.budget_epochs, or what is left under msft.max_epochs
    trained_epochs: float = 0.0  # epochs trained in the stages before this one, kept and discarded
    stale: int = 0  # stages in a row whose roll-out found no better pooled evaluation
    stop_reason: Optional[str] = None


def run_msft(trainer: Trainer, history: History, metric: Metric) -> dict:
    cfg = trainer.cfg.msft
    names = list(trainer.task_names)
    weights_only = cfg.restore == "weights"
    # Worst case alive at once: one state per active task's best point plus the best pooled one
    # (and, with msft.min_delta, the latest evaluation: a task close to its best peaks there).
    states = len(names) + 1 + (1 if cfg.min_delta > 0 else 0)
    plan = plan_pool(trainer.model, states, not weights_only, local_world_size(), spill_dir=cfg.snapshot_spill_dir,
                     pinned=trainer.ctx.device.type == "cuda")  # CudaCopyEngine's buffers are page-locked
    plan["spill_reason"] = spill_reason(plan, cfg.snapshot_spill_dir)
    history.data["snapshot_pool"] = plan
    pool = trainer.make_pool(capacity=states, with_optimizer=not weights_only,
                             in_memory=plan["in_memory_states"], spill_dir=plan["spill_dir"])
    bound = compute_bound(trainer)
    history.data["compute_bound"] = bound
    if trainer.progress is not None:  # the run's length is bounded, not known: show the worst case
        trainer.progress.set_total(bound["worst_case_steps"], bound["worst_case_evals"], worst_case=True)
    max_epochs = max_trained_epochs(trainer.cfg)  # inf: no bound
    ledger = StageLedger(trainer)
    st: MsftState = trainer.resumed_method_state()
    if st is None:
        announce(trainer, describe_bound(bound))
        start = evaluate(trainer, history, metric, stage=0, active=set(names))
        start_state = trainer.capture()
        st = MsftState(list(names), start, start_state, start, pool.retain(start_state), ledger.start)
    ledger.start = st.ledger
    trainer.method_state = st
    report = PeriodicReport(os.path.dirname(history.path))
    warned_evals: Optional[int] = None

    while st.active and st.stage < cfg.max_stages:
        trainer.tags["stage"] = st.stage
        if not st.rollout:  # the stage begins
            begin = trainer.epoch_position
            length = rollout_length(trainer, cfg.budget_epochs, max_epochs - st.trained_epochs)
            if length <= 1e-9 or trainer.steps_until(begin + length) == 0:
                if length < cfg.budget_epochs:  # what is left of the bound is less than one step
                    st.stop_reason = "max_epochs"
                    break
                raise on_every_rank(ConfigError(f"config key 'msft.budget_epochs' ({cfg.budget_epochs}) is less than "
                                                "one optimizer step"))
            st.rollout, st.held, st.start_state = [st.start], {0: st.start_state}, None  # held owns it now
            st.begin, st.next_target, st.length = begin, 0, length
            n_evals = len({trainer.steps_until(p) for p in eval_points(begin, length, cfg.evals_per_epoch)})
            if n_evals < 2 and n_evals != warned_evals:
                warned_evals = n_evals
                announce(trainer, few_evaluations_warning(trainer, st.stage, length), logging.WARNING)
        targets = eval_points(st.begin, st.length, cfg.evals_per_epoch)
        while st.next_target < len(targets):
            trainer.train_until(targets[st.next_target])  # a checkpoint inside resumes right here
            st.next_target += 1
            if trainer.counters.step == st.rollout[-1].step:
                continue  # fewer steps than evaluations: this state is already evaluated
            ev = evaluate(trainer, history, metric, stage=st.stage, active=set(st.active))
            st.rollout.append(ev)
            costs = [e.costs for e in st.rollout]
            needed = set(task_peaks(costs, st.active, cfg.peak_ties).values())
            if cfg.min_delta > 0:  # a task within min_delta of its best counts as peaking at the latest
                needed.add(len(st.rollout) - 1)
            for i in [i for i in st.held if i not in needed]:
                pool.release(st.held.pop(i))
            last = len(st.rollout) - 1
            if last in needed:
                st.held[last] = trainer.capture()
            if ev.pooled_cost < st.best.pooled_cost:
                pool.release(st.best_state)
                st.best = ev
                st.best_state = pool.retain(st.held[last]) if last in st.held else trainer.capture()
            if cfg.patience is not None and peak_confirmed(costs, st.active, cfg.patience, cfg.min_delta,
                                                           cfg.peak_ties):
                break
        _end_stage(trainer, history, st, ledger, weights_only, report, metric.name, max_epochs)
        st.ledger = ledger.start
        if cfg.max_stale_stages is not None and st.stale >= cfg.max_stale_stages:
            st.stop_reason = "max_stale_stages"
            break

    if st.stop_reason is None:
        st.stop_reason = "no_active_task" if not st.active else "max_stages"
    bound.update(epochs_trained=round(st.trained_epochs, 6), stop_reason=st.stop_reason)
    announce(trainer, f"mSFT stopped after {st.stage} stage(s): {STOP_TEXT[st.stop_reason]}; "
                      f"{st.trained_epochs:.2f} epochs trained over all stages; final model: eval {st.best.eval_id} "
                      f"(stage {st.best.record['stage']}, epoch {st.best.epoch:.2f}), the best pooled "
                      f"{metric.name} {st.best.record['pooled_metric']:.4f}")
    pool.release(st.start_state)
    trainer.restore(st.best_state, weights_only=True)
    return final_record(st.best)


def _end_stage(trainer: Trainer, history: History, st: MsftState, ledger: StageLedger, weights_only: bool,
               report: PeriodicReport, metric_name: str, max_epochs: float) -> None:
    """Record the roll-out's decision, say it, roll back if a task is excluded, and set up the next stage."""
    cfg, names, rollout, pool = trainer.cfg.msft, trainer.task_names, st.rollout, trainer.pool
    decision = choose_exclusion([e.costs for e in rollout], st.active, cfg.tie_break, cfg.min_delta, cfg.peak_ties)
    peak_ids = {k: rollout[i].eval_id for k, i in decision.peaks.items()}
    epochs = trainer.epoch_position - st.begin  # trained in this roll-out, before any roll-back
    st.trained_epochs += epochs
    improved = any(e.eval_id == st.best.eval_id for e in rollout[1:])
    st.stale = 0 if improved else st.stale + 1
    common = dict(peak_evals=peak_ids, epochs_trained=round(epochs, 6))
    if decision.excluded is None:
        keep = len(rollout) - 1
        record = ledger.close(start_eval=rollout[0].eval_id, end_eval=rollout[-1].eval_id)
        history.add_stage(st.stage, excluded=None, rollback_to_eval=None, **common, **record)
    else:
        keep = decision.peak_index
        target = rollout[keep]
        record = ledger.close(start_eval=rollout[0].eval_id, end_eval=rollout[-1].eval_id, rollback=target.record)
        history.add_stage(st.stage, excluded=decision.excluded, rollback_to_eval=target.eval_id, **common, **record)
        trainer.restore(st.held[keep], weights_only=weights_only)
        st.active.remove(decision.excluded)
        if st.active:
            trainer.set_active([names.index(k) for k in st.active])
    history.write(trainer.ctx.is_main)
    announce(trainer, describe_decision(st, decision, rollout, record, epochs, improved, metric_name, max_epochs))
    if trainer.ctx.is_main:
        report(history.data)  # curves with this stage's decision
    # The kept state starts the next stage; every other state of this roll-out is released.
    st.start, st.start_state = rollout[keep], st.held.pop(keep)
    for snap in st.held.values():
        pool.release(snap)
    st.rollout, st.held = [], {}
    st.stage += 1


def rollout_length(trainer: Trainer, budget: float, left: float) -> float:
    """Epochs of the next roll-out: the budget C, cut to what is left of msft.max_epochs. Steps are
    whole, and train_until rounds a target to the nearest step, so a roll-out that would overshoot
    what is left ends at the last step boundary inside it: the bound holds exactly."""
    begin = trainer.epoch_position
    length = min(budget, left)
    if reached(trainer, begin + length) - begin <= left + 1e-9:
        return length
    target = begin + left
    epoch = math.floor(target + 1e-9)
    steps = max(1, trainer.loader.steps_in_epoch(epoch))
    return epoch + math.floor((target - epoch) * steps + 1e-9) / steps - begin


def reached(trainer: Trainer, target: float) -> float:
    """The epoch position `trainer.train_until(target)` stops at (its loop, without training)."""
    loader, epoch, step = trainer.loader, trainer.counters.epoch, trainer.counters.step_in_epoch
    while True:
        step = max(step, loader.last_step_of(epoch, target))
        if step >= loader.steps_in_epoch(epoch) and target > epoch + 1 - 1e-9:
            epoch, step = epoch + 1, 0
            if target > epoch:
                continue
        return epoch + step / max(1, loader.steps_in_epoch(epoch))


# ---------------------------------------------------------------------------------------------
# What the run tells the user: the compute bound, each decision, the snapshot plan


def compute_bound(trainer: Trainer) -> dict:
    """The most this run can spend (history.json `compute_bound`). Epochs count every step once,
    kept or rolled back, in epochs of the mixture active then; an epoch of fewer tasks costs less,
    so `max_epochs` x the FLOPs of an epoch of all tasks bounds the training compute."""
    cfg = trainer.cfg
    m = cfg.msft
    max_epochs = max_trained_epochs(cfg)
    worst = min(max_epochs, m.max_stages * m.budget_epochs)
    train_lengths = [int(n) for t in trainer.tasks for n in t.train.lengths]
    val_lengths = [int(n) for t in trainer.tasks for n in t.val.lengths]
    epoch_flops = trainer.flop_counter.train(sum(train_lengths), train_lengths)
    full_rollouts = min(m.max_stages, math.floor(worst / m.budget_epochs + 1e-9))
    rest = worst - full_rollouts * m.budget_epochs
    evals = 1 + full_rollouts * len(eval_points(0.0, m.budget_epochs, m.evals_per_epoch))
    if rest > 1e-9 and full_rollouts < m.max_stages:
        evals += len(eval_points(0.0, rest, m.evals_per_epoch))
    return {
        "max_epochs": None if math.isinf(max_epochs) else max_epochs,  # null: no bound (msft.max_epochs=inf)
        "max_epochs_is_default": m.max_epochs is None,  # 2 x train.epochs
        "max_stages": m.max_stages,
        "budget_epochs": m.budget_epochs,
        "max_stale_stages": m.max_stale_stages,
        "worst_case_epochs": worst,
        "epoch_train_flops": epoch_flops,  # one epoch of all tasks
        "worst_case_train_flops": worst * epoch_flops,
        # Every epoch counted at the length of an epoch of all tasks (an epoch of fewer is shorter).
        "worst_case_steps": math.ceil(worst * trainer.loader.steps_in_full_epoch() - 1e-9),
        "worst_case_evals": evals,
        # Generation (exact match) at its most: every answer runs to max_new_tokens.
        "worst_case_eval_flops": evals * (trainer.flop_counter.eval(sum(val_lengths), val_lengths)
                                          + trainer.max_generation_flops()),
        "sft_train_flops": cfg.train.epochs * epoch_flops,  # SFT for train.epochs, for comparison
        "epochs_trained": None,  # filled in when the run ends
        "stop_reason": None,
    }


def describe_bound(b: dict) -> str:
    loop = (f"msft.max_stages {b['max_stages']} x msft.budget_epochs {b['budget_epochs']:g} = "
            f"{b['max_stages'] * b['budget_epochs']:g} epochs")
    if b["max_epochs"] is None:
        head = f"no compute bound (msft.max_epochs=inf): at most {loop}"
    else:
        where = "default: 2 x train.epochs" if b["max_epochs_is_default"] else "set"
        head = (f"at most {b['max_epochs']:g} epochs trained over all stages, kept and discarded (msft.max_epochs, "
                f"{where}; the loop alone allows {loop}; msft.max_epochs=inf lifts the bound)")
    ratio = b["worst_case_train_flops"] / b["sft_train_flops"] if b["sft_train_flops"] else float("nan")
    return (f"mSFT compute bound: {head}; worst case {format_flops(b['worst_case_train_flops'])} of training "
            f"({ratio:.2g}x the {format_flops(b['sft_train_flops'])} of SFT over train.epochs) and "
            f"{b['worst_case_evals']} evaluations ({format_flops(b['worst_case_eval_flops'])})")


def describe_decision(st: MsftState, decision: Decision, rollout: list[Evaluation], record: dict, epochs: float,
                      improved: bool, metric_name: str, max_epochs: float) -> str:
    """One line per stage: what was excluded at which peak, what the roll-back threw away, who is left."""
    bound = "" if math.isinf(max_epochs) else f" of msft.max_epochs {max_epochs:g}"
    spent = f"{epochs:.2f} epochs trained in this roll-out, {st.trained_epochs:.2f}{bound} so far"
    left = f"{len(st.active)} task(s) still active: {', '.join(st.active) or 'none'}"
    best = "" if improved else "; no better pooled evaluation in this roll-out"
    if decision.excluded is None:
        last = rollout[-1]
        return (f"stage {st.stage}: nothing excluded: every active task was still at its best at the roll-out's "
                f"last evaluation (eval {last.eval_id}, epoch {last.epoch:.2f}); going on from there; {left}; "
                f"{spent}{best}")
    peak = rollout[decision.peak_index]
    value = peak.record["tasks"][decision.excluded]["metric"]
    return (f"stage {st.stage}: excluded '{decision.excluded}', which peaked at eval {peak.eval_id} (epoch "
            f"{peak.epoch:.2f}, {metric_name} {value:.4f}); rolled back to that state: {record['steps_discarded']} "
            f"step(s) and {format_flops(record['discarded_flops'])} discarded, training goes on from epoch "
            f"{peak.epoch:.2f} (step {peak.step}) without it; {left}; {spent}{best}")


def few_evaluations_warning(trainer: Trainer, stage: int, length: float) -> str:
    cfg = trainer.cfg.msft
    steps = trainer.steps_until(trainer.epoch_position + length)
    return (f"stage {stage}: the roll-out of {length:g} epoch(s) ({steps} optimizer step(s)) holds fewer than 2 "
            f"evaluations after its start (msft.budget_epochs {cfg.budget_epochs:g} x msft.evals_per_epoch "
            f"{cfg.evals_per_epoch}), so a task is excluded only when it got worse at once, and no roll-back can "
            "land inside the roll-out; raise msft.evals_per_epoch or msft.budget_epochs")


def spill_reason(plan: dict, spill_dir: Optional[str]) -> str:
    """Why the pool spills to disk, or why it does not (history.json `snapshot_pool.spill_reason`)."""
    states, in_memory = plan["states"], plan["in_memory_states"]
    if in_memory < states:
        return (f"host memory holds {in_memory} of the {states} states the run may need at once; older states "
                f"spill to msft.snapshot_spill_dir ({spill_dir})")
    if plan["host_available"] < 0:
        return "free host memory could not be measured, so every state stays in memory and nothing spills"
    size = plan["bytes_per_host"] / 2**20
    worst = f"the worst case ({states} states, {size:.1f} MiB on this host) fits in host memory"
    return worst + (", so nothing spills to msft.snapshot_spill_dir" if spill_dir else
                    "; nothing spills (msft.snapshot_spill_dir is not set, and not needed)")
