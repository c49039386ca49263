"""Validation rows whose exact-match score is known in advance, for a model folder whose answers are
computed here independently of the trainer: plain HF `generate`, one row at a time, no padding.

Even rows get the model's own greedy answer as the reference (correct when the trainer generates
right), odd rows that answer with a '#' appended (wrong). Prompts are the prompt of a prompt/completion
row, or the chat template's generation prompt (`apply_chat_template(messages[:-1],
add_generation_prompt=True)`) of a chat row.
"""
from __future__ import annotations

import torch


def prompt_ids(tokenizer, row: dict) -> list[int]:
    if "messages" in row:
        out = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return list(tokenizer(row["prompt"])["input_ids"])


def greedy_answer(model, tokenizer, ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> str:
    """The model's greedy answer: its new tokens before the first stop token, decoded without
    special tokens and trimmed."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(new) if t in stop_ids), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True).strip()


def with_answer(row: dict, answer: str) -> dict:
    if "messages" in row:
        return {"messages": row["messages"][:-1] + [{"role": "assistant", "content": answer}]}
    return {"prompt": row["prompt"], "completion": answer}


def known_answer_rows(model, tokenizer, rows: list[dict], max_new_tokens: int, stop_ids: list[int]
                      ) -> tuple[list[dict], list[str], list[bool]]:
    """(rows with known references, the model's own answers, whether each row must count as correct)."""
    answers = [greedy_answer(model, tokenizer, prompt_ids(tokenizer, r), max_new_tokens, stop_ids) for r in rows]
    out = [with_answer(r, a if i % 2 == 0 else a + "#") for i, (r, a) in enumerate(zip(rows, answers))]
    return out, answers, [i % 2 == 0 for i in range(len(rows))]
