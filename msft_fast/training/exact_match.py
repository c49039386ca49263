"""Exact match of generated answers (`msft.metric: val_exact_match`, the signal of the mSFT paper):
a greedy answer to every validation prompt, compared with the reference answer.

Prompts and references come from the tokenized validation documents, so they are exactly what
the model trains and validates on. A document's prompt is everything before its last trained span:
the prompt of a prompt/completion row, or the conversation up to the last assistant turn as the
chat template renders it, ending with the assistant header (the template's generation prompt:
`apply_chat_template(messages[:-1], add_generation_prompt=True)` gives the same tokens for the
built-in template and the families in tests/families.py). The reference is that span's text up to
its first stop token (EOS, or an end-of-turn token such as `<|im_end|>`).

Both answers are decoded without special tokens and trimmed of surrounding whitespace; with an
`answer_pattern` (a regex such as `####\\s*(.+)`), both are then reduced to the pattern's first
group (or its whole match) at its first match, trimmed again. A generated answer the pattern does
not find is wrong; a reference it does not find stops the run before training. Plain-text tasks
have no prompt and cannot be scored: they stop the run too.

Rows are batched per task (longest prompts first, at most `msft.generation_tokens_per_batch`
tokens of prompt + new tokens per batch) independently of the number of ranks, and the batches are
dealt to ranks, so 1 rank and N ranks generate the same batches and count the same answers.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from msft_fast.config import Config
from msft_fast.data.formats import IGNORE_INDEX
from msft_fast.data.tasks import TaskData
from msft_fast.runtime.distributed import all_reduce_sum
from msft_fast.errors import ConfigError, DataError, on_every_rank
from msft_fast.flops import FlopCounter
from msft_fast.training.generation import GenerateFn


@dataclass
class AnswerTask:
    """One task's validation rows as questions: prompts [D] (token ids) and reference answers [D]."""

    name: str
    prompts: list[list[int]]
    references: list[str]  # normalised (trimmed, and reduced by the pattern)
    pattern: Optional[re.Pattern]
    max_new_tokens: int


@dataclass(frozen=True)
class AnswerBatch:
    task: int  # index into the answer tasks
    rows: tuple[int, ...]  # validation documents of that task, longest prompt first

    def cost(self, tasks: Sequence[AnswerTask]) -> int:
        t = tasks[self.task]
        return len(self.rows) * (len(t.prompts[self.rows[0]]) + t.max_new_tokens)


@dataclass
class ExactMatchCounts:
    """One evaluation's answers, summed over ranks: per task [T] correct and scored answers."""

    correct: list[int]
    answers: list[int]
    generated_tokens: int  # stop tokens included
    flops: int  # useful work only (flops.py: FlopCounter.generation)
    seconds: float = 0.0

    def accuracy(self, task: int) -> float:
        return self.correct[task] / self.answers[task] if self.answers[task] else float("nan")

    @property
    def pooled(self) -> float:
        """Over all answers of all tasks, as the paper pools (not a mean of the tasks' accuracies)."""
        total = sum(self.answers)
        return sum(self.correct) / total if total else float("nan")


def normalise(text: str, pattern: Optional[re.Pattern]) -> Optional[str]:
    """The part of an answer that is compared: trimmed, then the pattern's first group (or whole
    match) at its first match, trimmed; None when the pattern does not match."""
    text = text.strip()
    if pattern is None:
        return text
    m = pattern.search(text)
    if m is None:
        return None
    return (m.group(1) if pattern.groups else m.group(0)).strip()


def split_document(input_ids: np.ndarray, labels: np.ndarray) -> tuple[list[int], list[int]]:
    """(prompt, answer span) of one document: the answer span is its last run of trained tokens
    (token j is trained when labels[j - 1] is set), the prompt everything before it."""
    trained = np.flatnonzero(labels[:-1] != IGNORE_INDEX) + 1  # positions of trained tokens
    if len(trained) == 0:
        return input_ids.tolist(), []
    end = int(trained[-1]) + 1
    gaps = np.flatnonzero(np.diff(trained) > 1)
    start = int(trained[gaps[-1] + 1]) if len(gaps) else int(trained[0])
    return input_ids[:start].tolist(), input_ids[start:end].tolist()


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids the tokenizer marks special (decoding with skip_special_tokens leaves them out)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()))
    ids |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return ids


def stop_token_ids(tokenizer: Any, lm: Any, spans: Sequence[Sequence[int]]) -> set[int]:
    """Tokens that end an answer: the tokenizer's and the model's EOS, and the last special token of
    every reference span (the end of turn of a chat row: <|im_end|>, <|eot_id|>, <end_of_turn>);
    a special token inside an answer (Qwen3's <think>) is not one."""
    special = special_token_ids(tokenizer)
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids |= set(eos if isinstance(eos, (list, tuple)) else [eos])
    for span in spans:
        last = next((t for t in reversed(span) if t in special), None)
        ids.add(last)
    ids.discard(None)
    return ids


def until_stop(tokens: Sequence[int], stops: set[int]) -> list[int]:
    """The tokens before the first stop token."""
    out = []
    for t in tokens:
        if t in stops:
            break
        out.append(t)
    return out


class ExactMatch:
    """The answer tasks of a run and their batches; `evaluate` generates this rank's share and
    returns the counts summed over ranks."""

    def __init__(self, cfg: Config, tasks: list[TaskData], tokenizer: Any, lm: Any):
        self.tokenizer = tokenizer
        for task in tasks:
            _check_has_prompts(cfg, task)
        split = [[split_document(*_document(t.val, d)) for d in range(len(t.val))] for t in tasks]
        self.stops = stop_token_ids(tokenizer, lm, [span for docs in split for _, span in docs])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0  # padded positions are masked out: any id will do
        self.tasks = [self._answer_task(cfg, t, docs) for t, docs in zip(tasks, split)]
        budget = cfg.msft.generation_tokens_per_batch or cfg.data.tokens_per_batch
        self.batches = plan_batches(self.tasks, budget)
        self.batch_tokens = max(b.cost(self.tasks) for b in self.batches)
        self._filler = min(range(len(self.batches)), key=lambda b: (self.batches[b].cost(self.tasks), b))

    def _answer_task(self, cfg: Config, task: TaskData, docs: list[tuple[list[int], list[int]]]) -> AnswerTask:
        key = f"data.tasks[{task.task_id}]"
        spec = cfg.data.tasks[task.task_id].answer_pattern
        source = f"{key}.answer_pattern" if spec is not None else "msft.answer_pattern"
        spec = cfg.msft.answer_pattern if spec is None else spec
        pattern = re.compile(spec) if spec else None
        prompts, references, longest = [], [], 1
        for d, (prompt, span) in enumerate(docs):
            answer = until_stop(span, self.stops)
            longest = max(longest, min(len(answer) + 1, len(span)))  # the stop token is generated too
            text = self.tokenizer.decode(answer, skip_special_tokens=True)
            reference = normalise(text, pattern)
            if reference is None:
                raise on_every_rank(DataError(
                    f"task '{task.name}': the reference answer of validation document {d + 1} ({_clip(text)!r}) "
                    f"does not match {source} ('{spec}'), so it cannot be compared; fix the pattern or the data"))
            prompts.append(prompt)
            references.append(reference)
        return AnswerTask(task.name, prompts, references, pattern, cfg.msft.max_new_tokens or longest)

    def evaluate(self, generate: GenerateFn, rank: int, world_size: int, lockstep: bool, flop_counter: FlopCounter,
                 device: torch.device) -> ExactMatchCounts:
        """Generate and score this rank's batches; every rank must call this together (the counts
        are summed over ranks). lockstep: every rank makes the same number of generate calls (the
        weights are gathered in every forward), padding its share with a batch it then ignores."""
        t0 = time.perf_counter()
        T = len(self.tasks)
        counts = torch.zeros(2 * T + 2, dtype=torch.int64)  # correct [T], answers [T], new tokens, FLOPs
        deal = deal_batches(self.batches, self.tasks, world_size)
        mine = deal[rank]
        calls = max(len(d) for d in deal) if lockstep else len(mine)
        for i in range(calls):
            batch = self.batches[mine[i] if i < len(mine) else self._filler]  # the cheapest, to keep in step
            task = self.tasks[batch.task]
            prompts = [task.prompts[r] for r in batch.rows]
            outputs = generate(prompts, task.max_new_tokens, sorted(self.stops), self.pad_id)
            if i >= len(mine):
                continue
            for row, prompt, new in zip(batch.rows, prompts, outputs):
                text = self.tokenizer.decode(until_stop(new, self.stops), skip_special_tokens=True)
                counts[batch.task] += int(normalise(text, task.pattern) == task.references[row])
                counts[T + batch.task] += 1
                counts[2 * T] += len(new)
                counts[2 * T + 1] += flop_counter.generation([len(prompt)], [len(new)])
        c = all_reduce_sum(counts.to(device)).tolist()
        return ExactMatchCounts(c[:T], c[T:2 * T], c[2 * T], c[2 * T + 1], time.perf_counter() - t0)

    def describe(self) -> dict:
        """What history.json keeps about the setup (`exact_match`)."""
        return {
            "answers": {t.name: len(t.prompts) for t in self.tasks},
            "max_new_tokens": {t.name: t.max_new_tokens for t in self.tasks},
            "answer_pattern": {t.name: t.pattern.pattern if t.pattern else None for t in self.tasks},
            "stop_tokens": [self.tokenizer.convert_ids_to_tokens(i) for i in sorted(self.stops)],
            "batches": len(self.batches),
        }


def _check_has_prompts(cfg: Config, task: TaskData) -> None:
    if task.val.format == "text":
        metric = ("msft.metric=val_exact_match" if cfg.msft.metric == "val_exact_match" else
                  "msft.report_exact_match=true")
        raise on_every_rank(ConfigError(
            f"config key 'data.tasks[{task.task_id}]': task '{task.name}' has plain-text rows, with no prompt to "
            f"generate an answer from, so exact match ({metric}) cannot score it; give it prompt/completion or "
            "messages rows, or select by msft.metric=val_loss"))


def _document(docs: Any, d: int) -> tuple[np.ndarray, np.ndarray]:
    s, n = int(docs.starts[d]), int(docs.lengths[d])
    return docs.input_ids[s:s + n], docs.labels[s:s + n]


def plan_batches(tasks: Sequence[AnswerTask], tokens_per_batch: int) -> list[AnswerBatch]:
    """Per task, rows sorted by prompt length (longest first, then document order) and cut into
    batches of at most `tokens_per_batch` tokens of padded prompt + new tokens (one row at least)."""
    batches = []
    for i, t in enumerate(tasks):
        order = sorted(range(len(t.prompts)), key=lambda r: (-len(t.prompts[r]), r))
        rows: list[int] = []
        for r in order:
            width = len(t.prompts[rows[0]]) if rows else len(t.prompts[r])
            if rows and (len(rows) + 1) * (width + t.max_new_tokens) > tokens_per_batch:
                batches.append(AnswerBatch(i, tuple(rows)))
                rows = []
            rows.append(r)
        if rows:
            batches.append(AnswerBatch(i, tuple(rows)))
    return batches


def deal_batches(batches: Sequence[AnswerBatch], tasks: Sequence[AnswerTask], world_size: int) -> list[list[int]]:
    """Batch indices per rank: costliest first, each to the rank with the least work so far (the
    lowest rank on ties); deterministic, so every rank computes the same deal."""
    load = [0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for b in sorted(range(len(batches)), key=lambda b: (-batches[b].cost(tasks), b)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        out[r].append(b)
        load[r] += batches[b].cost(tasks)
    return out


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."
