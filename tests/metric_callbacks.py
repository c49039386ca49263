"""A user metric for tests: `msft.metric=metric_callbacks:greedy_match` (tests/ is on sys.path)."""
import torch

CALLS = []


def greedy_match(model, tokenizer, task_names):
    """Generates from the (FSDP-sharded, gathered for the call) model like a real exact-match metric."""
    prompt = tokenizer("Uppercase: abc", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert prompt["input_ids"].shape[1] < out.shape[1] <= prompt["input_ids"].shape[1] + 3  # may stop at EOS
    CALLS.append(len(task_names))
    # A score per task that depends on the weights, so it moves as training goes.
    head = float(model.get_output_embeddings().weight.float().abs().mean())
    return {name: head * (i + 1) for i, name in enumerate(task_names)}


_EVALS = [0]


def scripted(model, tokenizer, task_names):
    """A metric that makes the first task peak at the second evaluation and every other task keep
    improving, whatever the data: it forces one exclusion and one real roll-back, deterministically."""
    _EVALS[0] += 1
    n = _EVALS[0]
    return {name: -float((n - 2) ** 2) if i == 0 else float(n) for i, name in enumerate(task_names)}


_IMPROVING, _WORSENING = [0], [0]


def always_improving(model, tokenizer, task_names):
    """Every task better at every evaluation: no task ever peaks before the last evaluation."""
    _IMPROVING[0] += 1
    return {name: float(_IMPROVING[0]) for name in task_names}


def getting_worse(model, tokenizer, task_names):
    """Every task worse at every evaluation: each peaks at its stage start, the pooled best never moves."""
    _WORSENING[0] += 1
    return {name: -float(_WORSENING[0]) for name in task_names}


PLATEAU = [0]


def plateau(model, tokenizer, task_names):
    """Every task peaks at the second evaluation, then slips by 0.01 per evaluation (flat, jittery
    curves; the first task slips a little faster). Reset PLATEAU[0] = 0 before a run."""
    PLATEAU[0] += 1
    n = PLATEAU[0]
    return {name: 0.0 if n < 2 else 1.0 - (0.011 if i == 0 else 0.01) * (n - 2) for i, name in enumerate(task_names)}


TWO_ROLLBACKS = [0]


def two_rollbacks(model, tokenizer, task_names):
    """Higher is better: the first task peaks at the run's 2nd evaluation, the second at its 4th,
    whatever the data. With two evaluations per roll-out: stage 0 excludes the first task and rolls
    back to its 2nd evaluation, stage 1 the second one and rolls back to the 4th (both mid-roll-out
    states, with optimizer state behind them). Reset TWO_ROLLBACKS[0] = 0 before a run."""
    TWO_ROLLBACKS[0] += 1
    n = TWO_ROLLBACKS[0]
    peaks = (2, 4) + tuple(range(100, 100 + len(task_names)))
    return {name: -float((n - peaks[i]) ** 2) for i, name in enumerate(task_names)}
