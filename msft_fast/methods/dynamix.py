"""DynamixSFT (Shin et al., arXiv 2508.12116): the task mixture as a multi-armed bandit, one arm per
task. Every step's documents are drawn from the current task proportions (each task's documents
uniformly, with replacement; loader.ProportionalSampler); every `dynamix.update_every` optimizer
steps each task's reward is measured by a one-step look-ahead and the proportions move.

- Prior-scaled Boltzmann exploration (the paper's Eq. 3), anchored to the original proportions p0
  (each task's share of the training documents):
      p_k = (1 - gamma) * p0_k exp(beta Q_k) / sum_j p0_j exp(beta Q_j) + gamma / K
- 1-step look-ahead reward (Eq. 4): on a step's worth of task k's documents, one virtual optimizer
  step; r_k = mean over the documents of (L_pre - L_post) / (L_pre + epsilon), each L a document's
  mean token loss. The rewards are min-max normalised across tasks, then Q_k <- alpha Q_k +
  (1 - alpha) r_k (Eq. 5). Q starts at 0, so the first proportions are (1 - gamma) p0 + gamma / K.

Where the paper leaves it open (its text says the look-ahead needs forward passes only, its
Algorithm a virtual update): here the virtual step is the run's own optimizer step (AdamW with its
state, at the current lr, with clipping), taken and then undone bitwise through the snapshot pool.
L_pre comes from the forward of that step's backward, L_post from one more forward, so a look-ahead
costs a training step plus an evaluation pass over K batches; those FLOPs count in `train_flops`
(and `totals.lookahead_flops`), never as kept. Otherwise the run is plain SFT: an epoch is as many
steps as an epoch of the full mixture, the same evaluations, and the final model is the evaluation
with the best pooled metric.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from msft_fast.data.loader import ProportionalSampler
from msft_fast.state.history import History
from msft_fast.methods.ledger import StageLedger
from msft_fast.methods.metric import Metric
from msft_fast.methods.records import Evaluation, announce, eval_points, evaluate
from msft_fast.methods.sft import final_record, keep_if_best
from msft_fast.state.snapshot import Snapshot
from msft_fast.training.trainer import Trainer


def prior_proportions(doc_counts: Sequence[int]) -> np.ndarray:
    """[K] each task's share of the training documents: the original mixture, p0."""
    counts = np.asarray(doc_counts, dtype=np.float64)
    return counts / counts.sum()


def sampling_probabilities(q: np.ndarray, prior: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """[K] prior-scaled Boltzmann probabilities with a uniform floor (tasks with prior 0 get 0)."""
    arms = prior > 0
    logits = np.where(arms, beta * np.asarray(q, dtype=np.float64) + np.log(np.where(arms, prior, 1.0)), -np.inf)
    w = np.exp(logits - logits[arms].max())
    return np.where(arms, (1.0 - gamma) * w / w.sum() + gamma / arms.sum(), 0.0)


def relative_loss_drop(before: np.ndarray, after: np.ndarray, epsilon: float) -> float:
    """The 1-step look-ahead reward: mean over documents of (L_pre - L_post) / (L_pre + epsilon);
    documents without a finite loss are left out (NaN when none is left)."""
    ok = np.isfinite(before) & np.isfinite(after)
    if not ok.any():
        return math.nan
    return float(np.mean((before[ok] - after[ok]) / (before[ok] + epsilon)))


def normalise(rewards: np.ndarray) -> np.ndarray:
    """Min-max over the tasks, to [0, 1]; all equal gives 0 everywhere (the Boltzmann weights are
    shift-invariant, so that is no information), and a NaN reward (a diverged look-ahead) counts as
    the worst."""
    r = np.asarray(rewards, dtype=np.float64)
    finite = np.isfinite(r)
    if not finite.any():
        return np.zeros_like(r)
    lo, hi = r[finite].min(), r[finite].max()
    scaled = (r - lo) / (hi - lo) if hi > lo else np.zeros_like(r)
    return np.where(finite, scaled, 0.0)


def update_estimates(q: np.ndarray, normalised_rewards: np.ndarray, alpha: float) -> np.ndarray:
    """Q <- alpha Q + (1 - alpha) r: the exponential moving average of the normalised rewards."""
    return alpha * np.asarray(q, dtype=np.float64) + (1.0 - alpha) * normalised_rewards


@dataclass
class DynamixState:
    """Checkpointed with the trainer: the bandit's estimates and proportions, and the run's position
    among its evaluations and updates."""

    ledger: dict
    prior: np.ndarray
    q: np.ndarray
    proportions: np.ndarray
    updates: int = 0  # look-ahead updates done
    updated_at: int = 0  # optimizer step of the newest update
    next_target: int = 0  # index into the evaluation points; 0 is the start
    best: Optional[Evaluation] = None
    best_state: Optional[Snapshot] = None
    last: Optional[Evaluation] = None


def run_dynamix(trainer: Trainer, history: History, metric: Metric) -> dict:
    """Returns the `final` record; the trainer's model is left holding the chosen weights."""
    cfg = trainer.cfg
    dx = cfg.dynamix
    everyone = set(trainer.task_names)
    # The best evaluation's state, and the look-ahead's base (weights and optimizer, to undo its step).
    pool = trainer.make_pool(capacity=2, with_optimizer=True)
    ledger = StageLedger(trainer)
    st: DynamixState = trainer.resumed_method_state()
    if st is None:
        prior = prior_proportions([len(t.train) for t in trainer.tasks])
        q = np.zeros(len(prior))
        st = DynamixState(ledger.start, prior, q, sampling_probabilities(q, prior, dx.beta, dx.gamma))
    ledger.start = st.ledger
    trainer.method_state = st
    trainer.loader.set_sampler(ProportionalSampler(trainer.loader, st.proportions))
    if "dynamix" not in history.data:  # a resumed run has it (and its updates) from the checkpoint
        history.data["dynamix"] = {
            "beta": dx.beta, "gamma": dx.gamma, "alpha": dx.alpha, "update_every": dx.update_every,
            "epsilon": dx.epsilon, "prior": _per_task(trainer, st.prior), "updates": [],
        }
    _summarise(trainer, history, st)

    c = trainer.counters
    targets = [0.0] + eval_points(0.0, cfg.train.epochs, cfg.msft.evals_per_epoch)
    while st.next_target < len(targets):
        s = c.steps_trained
        if s > 0 and s % dx.update_every == 0 and st.updated_at < s and s < trainer.total_steps:
            _update(trainer, history, st)
            continue
        to_update = dx.update_every - s % dx.update_every
        if trainer.steps_until(targets[st.next_target]) > to_update:
            trainer.train_steps(to_update)  # a checkpoint inside resumes before the update
            continue
        trainer.train_until(targets[st.next_target])
        st.next_target += 1
        if st.last is not None and st.last.step == c.step:
            continue  # fewer steps per epoch than evaluations: this state is already evaluated
        st.last = evaluate(trainer, history, metric, stage=0, active=everyone)
        keep_if_best(st, pool, trainer)
    trainer.loader.set_sampler(None)
    _summarise(trainer, history, st)
    history.add_stage(0, excluded=None, rollback_to_eval=None, epochs_trained=round(trainer.epoch_position, 6),
                      **ledger.close(start_eval=0, end_eval=st.last.eval_id))
    history.write(trainer.ctx.is_main)
    trainer.restore(st.best_state, weights_only=True)
    return final_record(st.best)


def _update(trainer: Trainer, history: History, st: DynamixState) -> None:
    """Measure every task's 1-step look-ahead reward and move Q and the proportions."""
    dx, names = trainer.cfg.dynamix, trainer.task_names
    sampler: ProportionalSampler = trainer.loader.sampler
    flops_before = trainer.counters.lookahead_flops
    rewards = np.full(len(names), np.nan)
    for k in range(len(names)):
        if st.prior[k] > 0:
            before, after = trainer.lookahead(sampler.lookahead_plans(k, st.updates))
            rewards[k] = relative_loss_drop(before, after, dx.epsilon)
    scaled = normalise(rewards)
    st.q = update_estimates(st.q, scaled, dx.alpha)
    st.proportions = sampling_probabilities(st.q, st.prior, dx.beta, dx.gamma)
    sampler.set_proportions(st.proportions)
    st.updates += 1
    st.updated_at = trainer.counters.steps_trained
    history.data["dynamix"]["updates"].append({
        "update": st.updates, "step": st.updated_at, "epoch": round(trainer.epoch_position, 6),
        "rewards": _per_task(trainer, rewards), "normalised": _per_task(trainer, scaled),
        "q": _per_task(trainer, st.q), "proportions": _per_task(trainer, st.proportions),
        "lookahead_flops": trainer.counters.lookahead_flops - flops_before,
    })
    _summarise(trainer, history, st)
    history.write(trainer.ctx.is_main)
    announce(trainer, f"dynamix update {st.updates} at step {st.updated_at}: rewards "
             + ", ".join(f"{n} {r:+.4f}" for n, r in zip(names, rewards))
             + "; proportions " + ", ".join(f"{n} {p:.3f}" for n, p in zip(names, st.proportions)))


def _summarise(trainer: Trainer, history: History, st: DynamixState) -> None:
    c, names = trainer.counters, trainer.task_names
    h = history.data["dynamix"]
    h["proportions"] = _per_task(trainer, st.proportions)
    h["lookahead_flops"] = c.lookahead_flops
    h["lookahead_tokens"] = c.lookahead_tokens
    share = f" ({100 * c.lookahead_flops / c.train_flops:.1f}% of training FLOPs)" if c.train_flops else ""
    h["summary"] = (f"{st.updates} look-ahead update(s) every {trainer.cfg.dynamix.update_every} steps{share}; "
                    "task proportions now " + ", ".join(f"{n} {p:.3f}" for n, p in zip(names, st.proportions))
                    + " (original " + ", ".join(f"{n} {p:.3f}" for n, p in zip(names, st.prior)) + ")")


def _per_task(trainer: Trainer, values: np.ndarray) -> dict[str, Optional[float]]:
    return {n: (float(v) if math.isfinite(v) else None) for n, v in zip(trainer.task_names, values)}
