"""An mSFT metric for the roll-out benches (`msft.metric=rollback_metric:first_task_peaks_early`, with
bench/ on PYTHONPATH): the first task peaks at the second evaluation and every other task keeps
improving, whatever the model and data, so the first roll-out excludes it and rolls back once."""

_EVALS = [0]


def first_task_peaks_early(model, tokenizer, task_names):
    _EVALS[0] += 1
    n = _EVALS[0]
    return {name: -float((n - 2) ** 2) if i == 0 else float(n) for i, name in enumerate(task_names)}
