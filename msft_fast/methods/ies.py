"""IES, instance-dependent early stopping (Yuan et al., ICLR 2025; reference code
github.com/tmllab/2025_ICLR_IES): each training document's loss is recorded every time it is
trained, from the step's own loss pass (per-document sums of the fused loss, carried by the step's
one reduction); at each epoch end the documents whose loss has stopped changing are mastered and
leave the packing for the rest of the run. Otherwise plain SFT: the same evaluations, and the final
model is the evaluation with the best pooled metric.

The rule is the reference code's (`MasteryTracker.decide`). With L_1..L_n a document's recorded
losses (its mean token loss at each training) and D_i = L_i - 2 L_(i-1) + L_(i-2), a document is
mastered once it has at least window + k + 2 losses (the reference checks only with window + k
second differences in hand) and the sum over the k newest windows of `window` consecutive D's of
the mean |D| is below the threshold. One deliberate difference: the reference keeps forwarding
mastered instances (without gradients) every epoch and lets them return when their loss moves
again; here a mastered document never returns, because watching it would cost that extra forward
pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from msft_fast.state.history import History
from msft_fast.methods.ledger import StageLedger
from msft_fast.methods.metric import Metric
from msft_fast.methods.records import Evaluation, announce, eval_points, evaluate
from msft_fast.methods.sft import final_record, keep_if_best
from msft_fast.state.snapshot import Snapshot
from msft_fast.training.trainer import Trainer


class MasteryTracker:
    """The newest losses of every training document and which documents are mastered (and when).

    Plain numpy and deterministic: every rank records the same reduced losses and takes the same
    decisions; it is pickled with the method's state in every checkpoint.
    """

    def __init__(self, doc_counts: Sequence[int], threshold: float, window: int, k: int):
        self.threshold, self.window, self.k = threshold, window, k
        self.kept = window + k + 2  # losses the rule needs (the oldest only as the reference's entry ticket)
        self.losses = [np.full((n, self.kept), np.nan) for n in doc_counts]  # [docs, kept], newest last
        self.recorded = [np.zeros(n, dtype=np.int64) for n in doc_counts]  # losses recorded so far
        self.mastered_at = [np.full(n, -1, dtype=np.int64) for n in doc_counts]  # epoch end; -1: not mastered

    def record(self, tasks: np.ndarray, docs: np.ndarray, losses: np.ndarray) -> None:
        """One training of each (task index, document index) with its mean token loss; non-finite
        losses (a diverged step) are not recorded."""
        for t, d, loss in zip(tasks.tolist(), docs.tolist(), losses.tolist()):
            if not math.isfinite(loss):
                continue
            row = self.losses[t][d]
            row[:-1] = row[1:]
            row[-1] = loss
            self.recorded[t][d] += 1

    def scores(self, task: int) -> np.ndarray:
        """[docs] the rule's score: the sum over the k newest windows of the mean |D| in each (NaN
        until a document has `kept` losses)."""
        L = self.losses[task]
        second = np.abs(L[:, 2:] - 2 * L[:, 1:-1] + L[:, :-2])  # [docs, window + k]
        w = self.window
        score = sum(second[:, end - w + 1:end + 1].mean(axis=1) for end in range(w, w + self.k))
        return np.where(self.recorded[task] >= self.kept, score, np.nan)

    def decide(self, epoch: int) -> dict[int, np.ndarray]:
        """At the end of epoch `epoch` (1-based: epochs trained so far): the documents mastered now,
        per task index (sorted document indices); they are marked with `epoch`."""
        newly = {}
        for t in range(len(self.losses)):
            with np.errstate(invalid="ignore"):
                hit = (self.scores(t) < self.threshold) & (self.mastered_at[t] < 0)
            docs = np.flatnonzero(hit)
            self.mastered_at[t][docs] = epoch
            if len(docs):
                newly[t] = docs
        return newly

    def mastered_masks(self) -> dict[int, np.ndarray]:
        """Per task index with any mastered document, the bool mask of them (for the loader)."""
        return {t: m >= 0 for t, m in enumerate(self.mastered_at) if (m >= 0).any()}

    def remaining(self, task: int) -> int:
        return int((self.mastered_at[task] < 0).sum())


@dataclass
class IesState:
    """Checkpointed with the trainer, so a run resumes between two evaluations or epoch ends."""

    ledger: dict
    tracker: MasteryTracker
    next_position: int = 0  # index into the evaluation points and epoch ends
    best: Optional[Evaluation] = None
    best_state: Optional[Snapshot] = None
    last: Optional[Evaluation] = None
    stop_reason: Optional[str] = None
    decisions: list = field(default_factory=list)


def run_ies(trainer: Trainer, history: History, metric: Metric) -> dict:
    """Returns the `final` record; the trainer's model is left holding the chosen weights."""
    cfg = trainer.cfg
    names = list(trainer.task_names)
    pool = trainer.make_pool(capacity=1, with_optimizer=False)
    ledger = StageLedger(trainer)
    st: IesState = trainer.resumed_method_state()
    if st is None:
        tracker = MasteryTracker([len(t.train) for t in trainer.tasks], cfg.ies.threshold, cfg.ies.window, cfg.ies.k)
        st = IesState(ledger.start, tracker)
    ledger.start = st.ledger
    trainer.method_state = st
    trainer.loader.set_dropped(st.tracker.mastered_masks())  # a resumed run: mastered documents stay out
    trainer.doc_loss_observer = st.tracker.record
    history.data["ies"] = _summary(trainer, st)

    epochs = cfg.train.epochs
    evals = [0.0] + eval_points(0.0, epochs, cfg.msft.evals_per_epoch)
    # Decisions at every epoch end that more training follows (the run's end needs none).
    ends = [float(e) for e in range(1, math.ceil(epochs - 1e-9))]
    positions = sorted(set(evals) | set(ends))
    while st.next_position < len(positions):
        position = positions[st.next_position]
        trainer.train_until(position)
        st.next_position += 1
        if position in evals and (st.last is None or st.last.step != trainer.counters.step):
            active = {n for i, n in enumerate(names) if st.tracker.remaining(i)}
            st.last = evaluate(trainer, history, metric, stage=0, active=active)
            keep_if_best(st, pool, trainer)
        if position in ends:
            _decide(trainer, history, st, int(position))
            if st.stop_reason is not None:
                break
    trainer.doc_loss_observer = None
    if st.stop_reason is None:
        st.stop_reason = "epochs"
    history.data["ies"] = _summary(trainer, st)
    history.add_stage(0, excluded=None, rollback_to_eval=None, epochs_trained=round(trainer.epoch_position, 6),
                      **ledger.close(start_eval=0, end_eval=st.last.eval_id))
    history.write(trainer.ctx.is_main)
    trainer.restore(st.best_state, weights_only=True)
    return final_record(st.best)


def _decide(trainer: Trainer, history: History, st: IesState, epoch: int) -> None:
    """The epoch-end decision: mark the newly mastered documents and leave them out from now on."""
    names = trainer.task_names
    newly = st.tracker.decide(epoch)
    for t, docs in newly.items():
        trainer.loader.drop_documents(t, docs)
    remaining = {n: st.tracker.remaining(i) for i, n in enumerate(names)}
    st.decisions.append({
        "epoch": epoch, "step": trainer.counters.step,
        "newly_mastered": {names[t]: int(len(d)) for t, d in newly.items()},
        "remaining_docs": remaining,
    })
    left = sum(remaining.values())
    announce(trainer, f"ies: epoch {epoch}: {sum(len(d) for d in newly.values())} document(s) mastered"
             + (" (" + ", ".join(f"{names[t]} {len(d)}" for t, d in newly.items()) + ")" if newly else "")
             + f"; {left} of {sum(len(t.train) for t in trainer.tasks)} still trained")
    if left == 0:
        st.stop_reason = "all_mastered"
        announce(trainer, "ies: every training document is mastered; training stops here")
    history.data["ies"] = _summary(trainer, st)
    history.write(trainer.ctx.is_main)


def _summary(trainer: Trainer, st: IesState) -> dict:
    """history.json `ies`: the settings, each epoch end's decision, and the mastered documents per task."""
    cfg, names = trainer.cfg.ies, trainer.task_names
    mastered = {n: int((st.tracker.mastered_at[i] >= 0).sum()) for i, n in enumerate(names)}
    total = sum(len(t.train) for t in trainer.tasks)
    return {
        "threshold": cfg.threshold, "window": cfg.window, "k": cfg.k,
        "decisions": st.decisions,
        "mastered_docs": mastered,
        "train_docs": {t.name: len(t.train) for t in trainer.tasks},
        "stop_reason": st.stop_reason,
        "summary": (f"{sum(mastered.values())} of {total} training documents mastered and left out"
                    + (" (" + ", ".join(f"{n} {m}" for n, m in mastered.items() if m) + ")" if any(mastered.values())
                       else "") + f" over {len(st.decisions)} epoch end(s)"
                    + ("; training stopped: every document mastered" if st.stop_reason == "all_mastered" else "")),
    }
