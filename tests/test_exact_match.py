"""Exact match of generated answers (msft.metric=val_exact_match): prompts and references taken from
the validation documents, normalisation and answer patterns, batches that do not depend on the
number of ranks, weights gathered once per evaluation, and a run whose scores are known in advance
(the model's own greedy answers, computed with plain HF one row at a time)."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from conftest import tiny_llama, write_jsonl
from known_answers import greedy_answer, known_answer_rows, prompt_ids, with_answer

from msft_fast.data.formats import RowEncoder, labels_from_mask
from msft_fast.training.exact_match import AnswerTask, deal_batches, normalise, plan_batches, split_document

MAX_NEW = 6  # msft.max_new_tokens of the runs below


def test_answers_are_trimmed_and_reduced_by_the_pattern_on_both_sides():
    gsm = re.compile(r"####\s*(.+)")
    assert normalise("  The sum is 7.\n#### 7\n", gsm) == normalise("7 apples... #### 7", gsm) == "7"
    assert normalise("#### 7", gsm) != normalise("#### 17", gsm)
    assert normalise("no marker here: 7", gsm) is None  # a generated answer without it is wrong
    assert normalise("  ABCDE\n", None) == "ABCDE"
    assert normalise("x = 12;", re.compile(r"=\s*\d+")) == "= 12"  # no group: the whole match


def _encode(tokenizer, row, policy="train"):
    fmt = "messages" if "messages" in row else "prompt_completion"
    ids, mask = RowEncoder(tokenizer, fmt, policy).encode(row)
    return np.asarray(ids), np.asarray(labels_from_mask(ids, mask))


def test_prompt_completion_rows_split_into_their_prompt_and_completion(tokenizer):
    row = {"prompt": "sort dcba -> ", "completion": "abcd"}
    prompt, span = split_document(*_encode(tokenizer, row))
    assert prompt == tokenizer(row["prompt"])["input_ids"]
    assert tokenizer.decode(span) == "abcd</s>"


@pytest.mark.parametrize("family,policy", [("builtin", "train"), ("qwen2.5", "train"), ("qwen3", "train"),
                                           ("qwen3", "prompt"), ("llama3", "train"), ("gemma2", "train"),
                                           ("olmo2", "train")])
@pytest.mark.stack
def test_a_chat_prompt_is_the_templates_generation_prompt(tokenizer, family, policy):
    """The conversation before the last assistant turn, as training renders it, is what
    apply_chat_template(messages[:-1], add_generation_prompt=True) gives (Qwen3's empty think
    block kept as prompt: its enable_thinking=False prompt), and the reference is the turn's text."""
    from families import conversations, family_tokenizer

    if family == "builtin":
        rows = [{"messages": [{"role": "user", "content": "Reverse abc"}, {"role": "assistant", "content": "cba"},
                              {"role": "user", "content": "And abcd?"}, {"role": "assistant", "content": "dcba"}]}]
        tok = tokenizer
    else:
        rows = conversations(family, 3, seed=0, task="arith") + conversations(family, 2, seed=0, task="words")
        tok = family_tokenizer(family, [m["content"] for r in rows for m in r["messages"]] + ["system user"])
    for row in rows:
        prompt, span = split_document(*_encode(tok, row, policy))
        kwargs = {"enable_thinking": False} if policy == "prompt" else {}
        want = tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=True, **kwargs)
        assert prompt == list(want["input_ids"] if hasattr(want, "keys") else want)
        answer = tok.decode(span, skip_special_tokens=True).strip()
        assert answer == row["messages"][-1]["content"].strip()


def test_references_stops_and_the_default_max_new_tokens_come_from_the_validation_rows(tmp_path, tokenizer):
    """Stops: EOS and the chat rows' end of turn; max_new_tokens: per task its longest reference
    with its stop token; references trimmed and reduced by the task's pattern."""
    from msft_fast.config import load_config
    from msft_fast.data.tasks import load_tasks
    from msft_fast.training.exact_match import ExactMatch

    pc = [{"prompt": "q1 ", "completion": " 12 "}, {"prompt": "q2 ", "completion": "#### 7"}]
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "abcdef"}]}]
    files = {n: write_jsonl(tmp_path / f"{n}.jsonl", rows) for n, rows in (("pc", pc), ("chat", chat))}
    tasks = ", ".join(f"{{name: {n}, train: {f}, val: {f}}}" for n, f in files.items())
    cfg = load_config(None, [f"output_dir={tmp_path}/run", f"data.tasks=[{tasks}]", f"data.cache_dir={tmp_path}/c",
                             "msft.metric=val_exact_match", r"data.tasks[0].answer_pattern='(\d+)$'"])
    em = ExactMatch(cfg, load_tasks(cfg.data, tokenizer), tokenizer, tiny_llama(tokenizer))
    assert {tokenizer.convert_ids_to_tokens(i) for i in em.stops} == {"</s>", "<|end|>"}
    pc_task, chat_task = em.tasks
    assert pc_task.references == ["12", "7"] and chat_task.references == ["abcdef"]
    assert (pc_task.max_new_tokens, chat_task.max_new_tokens) == (len("#### 7") + 1, len("abcdef") + 1)
    assert chat_task.prompts[0] == prompt_ids(tokenizer, chat[0])
    assert em.describe()["answer_pattern"] == {"pc": r"(\d+)$", "chat": None}


def test_batches_are_the_same_on_any_number_of_ranks_and_each_goes_to_one_rank():
    rng = random.Random(0)
    tasks = [AnswerTask(f"t{k}", [[1] * rng.randint(3, 30) for _ in range(n)], ["x"] * n, None, new)
             for k, (n, new) in enumerate([(37, 4), (5, 12), (60, 2)])]
    batches = plan_batches(tasks, tokens_per_batch=200)
    for b in batches:
        t = tasks[b.task]
        widths = [len(t.prompts[r]) for r in b.rows]
        assert widths == sorted(widths, reverse=True)  # longest first: the first row sets the padded width
        assert len(b.rows) == 1 or len(b.rows) * (widths[0] + t.max_new_tokens) <= 200
    assert sorted((b.task, r) for b in batches for r in b.rows) == [(k, r) for k, t in enumerate(tasks)
                                                                    for r in range(len(t.prompts))]
    for world in (1, 2, 3, 8):
        deal = deal_batches(batches, tasks, world)
        assert sorted(i for share in deal for i in share) == list(range(len(batches)))
        loads = [sum(batches[i].cost(tasks) for i in share) for share in deal]
        assert max(loads) - min(loads) <= max(b.cost(tasks) for b in batches)  # balanced within one batch


@pytest.fixture
def sharded(tokenizer):
    """A one-rank FSDP2 tiny Llama, and an unwrapped copy of the same weights."""
    from msft_fast.runtime.distributed import init_distributed, parallelize, shutdown_distributed
    from msft_fast.model import CausalLMWithTaskLoss, decoder_blocks

    ctx = init_distributed()
    try:
        lm = tiny_llama(tokenizer, seed=3)
        plain = tiny_llama(tokenizer, seed=3)
        wrapper = CausalLMWithTaskLoss(lm, 1)
        parallelize(wrapper, decoder_blocks(lm), torch.float32, ctx.device, fsdp="always")  # FSDP2 even on one CPU rank
        yield wrapper, plain, ctx.device
    finally:
        shutdown_distributed()


def test_weights_are_gathered_once_per_evaluation_not_once_per_token(sharded, tokenizer, monkeypatch):
    """`once` all-gathers every parameter once, however many tokens are generated; `per_forward`
    gathers the blocks in every forward; both give the plain model's greedy tokens, padded batch and all."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.tensor import DTensor

    from msft_fast.training.generation import ShardedGenerator

    wrapper, plain, device = sharded
    counts = {"block_gathers": 0, "param_gathers": 0}
    unshard, full_tensor = FSDPParamGroup.unshard, DTensor.full_tensor

    def counting_unshard(self, *a, **k):
        counts["block_gathers"] += not self.is_unsharded
        return unshard(self, *a, **k)

    def counting_full_tensor(self, *a, **k):
        counts["param_gathers"] += 1
        return full_tensor(self, *a, **k)

    monkeypatch.setattr(FSDPParamGroup, "unshard", counting_unshard)
    monkeypatch.setattr(DTensor, "full_tensor", counting_full_tensor)
    prompts = [tokenizer(t)["input_ids"] for t in ["Uppercase: abc", "sort qwerty -> ", "12+34=", "x"]]
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    params = len({id(p) for p in wrapper.lm.parameters()})
    seen, gathers, steps = {}, {}, {}
    for mode in ("once", "per_forward"):
        gen = ShardedGenerator(wrapper, torch.float32, device, world_size=1)
        gen.choose(mode, batch_tokens=256, reserved_bytes=0, ranks_per_host=1)
        for new in (4, 12):
            counts.update(block_gathers=0, param_gathers=0)
            with gen.session() as generate:
                seen[mode, new] = generate(prompts, new, stops, tokenizer.pad_token_id)
            forwards = max(len(row) for row in seen[mode, new])  # the prefill and one per token but the last
            if mode == "once":
                assert counts == {"block_gathers": 0, "param_gathers": params}
            else:  # the root once, the first block in every forward (the last one keeps its weights)
                assert counts["param_gathers"] == 0 and counts["block_gathers"] >= 1 + forwards
                gathers[new], steps[new] = counts["block_gathers"], forwards
    for new in (4, 12):
        want = []
        for p in prompts:
            out = plain.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist()
            want.append(out[: next((i + 1 for i, t in enumerate(out) if t in stops), len(out))])
        assert seen["once", new] == seen["per_forward", new] == want
    assert steps[12] > steps[4] and gathers[12] - gathers[4] >= steps[12] - steps[4]  # per token, per_forward


@pytest.mark.stack
@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3", "gemma2", "olmo2"])
def test_batched_generation_matches_plain_hf_row_by_row_in_every_family(family):
    """Left-padded batches, through the gathered copy and through the FSDP-wrapped model, give the
    tokens plain HF generates one row at a time (tied embeddings, Gemma 2's soft-capping, sliding
    window and eager attention, Qwen3's and OLMo 2's norms)."""
    from families import conversations, family_config, family_tokenizer
    from transformers import AutoModelForCausalLM

    from msft_fast.runtime.distributed import init_distributed, parallelize, shutdown_distributed
    from msft_fast.training.generation import ShardedGenerator, greedy_generate
    from msft_fast.model import CausalLMWithTaskLoss, decoder_blocks

    rows = conversations(family, 3, seed=0, task="arith") + conversations(family, 3, seed=0, task="words")
    tok = family_tokenizer(family, [m["content"] for r in rows for m in r["messages"]] + ["system user"])
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(AutoModelForCausalLM.from_config(family_config(family, tok), dtype=torch.float32).eval())
    plain, lm = models
    prompts = [prompt_ids(tok, r) for r in rows]
    assert len({len(p) for p in prompts}) > 1  # the batch is padded
    ctx = init_distributed()
    try:
        wrapper = CausalLMWithTaskLoss(lm, 1)
        parallelize(wrapper, decoder_blocks(lm), torch.float32, ctx.device)
        want = [greedy_generate(plain, [p], 8, [tok.eos_token_id], tok.pad_token_id, ctx.device)[0] for p in prompts]
        for mode in ("once", "per_forward"):
            gen = ShardedGenerator(wrapper, torch.float32, ctx.device, world_size=1)
            gen.choose(mode, batch_tokens=1024, reserved_bytes=0, ranks_per_host=1)
            with gen.session() as generate:
                assert generate(prompts, 8, [tok.eos_token_id], tok.pad_token_id) == want, mode
    finally:
        shutdown_distributed()


def test_auto_gathers_once_when_the_copy_fits_and_per_forward_when_not(sharded, monkeypatch):
    import msft_fast.training.generation as generation

    wrapper, _, device = sharded
    gen = generation.ShardedGenerator(wrapper, torch.float32, device, world_size=1)
    need = gen.copy_bytes() + generation.generation_batch_bytes(wrapper.lm, torch.float32, 512)
    monkeypatch.setattr(generation, "free_memory", lambda device, ranks: 2 * need)
    assert gen.choose("auto", 512, reserved_bytes=0, ranks_per_host=1).mode == "once"
    choice = gen.choose("auto", 512, reserved_bytes=int(1.5 * need), ranks_per_host=1)  # the optimizer state to come
    assert choice.mode == "per_forward" and "does not" in choice.reason


# ---------------------------------------------------------------------------------------------
# A run whose scores are known: the model's own answers (plain HF, one row at a time)


@pytest.fixture(scope="module")
def known_tasks(tmp_path_factory, demo_dir, answering_model_dir, tokenizer):
    """Four tasks for the user model: prompt/completion and chat rows whose references are its own
    greedy answers on even rows (`own_pc`, `own_chat`), a task scored through an answer pattern
    (`pattern`: only the first three characters count), and one it does not know (`const`: every
    answer is 'ab'). Returns (task entries, per task the rows that must be correct)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("known")
    model = AutoModelForCausalLM.from_pretrained(answering_model_dir).eval()
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]  # a chat task adds <|end|>
    read = lambda task, split: [json.loads(x) for x in open(demo_dir / task / f"{split}.jsonl")]  # noqa: E731
    entries, expect = [], {}

    def add(name, train, val, correct, **extra):
        entries.append({"name": name, "train": write_jsonl(root / name / "train.jsonl", train),
                        "val": write_jsonl(root / name / "val.jsonl", val), **extra})
        expect[name] = correct

    for name, source, n in (("own_pc", "sort", 12), ("own_chat", "upper", 10)):
        val, _, correct = known_answer_rows(model, tokenizer, read(source, "val")[:n], MAX_NEW, stops)
        add(name, read(source, "train")[:24], val, correct)
    # The pattern keeps the first three characters: a reference that differs after them still
    # matches; a generated answer shorter than that matches nothing and is wrong.
    rows = read("noisy_codes", "val")[:8]
    answers = [greedy_answer(model, tokenizer, prompt_ids(tokenizer, r), MAX_NEW, stops) for r in rows]
    refs = [a[:3] + "~tail" if i % 2 == 0 else ("RRR" if a.startswith("QQQ") else "QQQ") for i, a in enumerate(answers)]
    add("pattern", read("noisy_codes", "train")[:16], [with_answer(r, x) for r, x in zip(rows, refs)],
        [i % 2 == 0 and len(a) >= 3 for i, a in enumerate(answers)], answer_pattern="(?s)^(.{3})")
    const = [{"prompt": f"k{i}=", "completion": "ab"} for i in range(8)]
    const_answers = [greedy_answer(model, tokenizer, prompt_ids(tokenizer, r), MAX_NEW, stops) for r in const]
    add("const", const, const, [a == "ab" for a in const_answers])
    return entries, expect


def _run(tmp_path, entries, *overrides):
    from msft_fast.config import load_config
    from msft_fast.run import train

    tasks = "[" + ", ".join("{" + ", ".join(f"{k}: '{v}'" for k, v in e.items()) + "}" for e in entries) + "]"
    return train(load_config(None, [
        f"output_dir={tmp_path / 'run'}", f"data.tasks={tasks}", "data.max_seq_len=64", "data.tokens_per_batch=256",
        f"data.cache_dir={tmp_path / 'cache'}", "train.progress=false", "train.lr=1e-2", "train.schedule=constant",
        "msft.metric=val_exact_match", f"msft.max_new_tokens={MAX_NEW}", *overrides]))


@pytest.mark.stack
@pytest.mark.slow
def test_exact_match_of_a_run_is_known_and_its_decisions_follow_the_curves(tmp_path, known_tasks,
                                                                            answering_model_dir):
    from test_msft import _assert_consistent

    entries, expect = known_tasks
    history = _run(tmp_path, entries, f"model.path={answering_model_dir}", "method=msft", "train.epochs=1",
                   "msft.budget_epochs=0.5", "msft.evals_per_epoch=4", "msft.max_stages=2")
    first = history["evals"][0]  # the model folder's own weights: every score is known
    for name, correct in expect.items():
        t = first["tasks"][name]
        assert (t["val_answers_correct"], t["val_answers"]) == (sum(correct), len(correct)), name
        assert t["val_exact_match"] == t["metric"] == sum(correct) / len(correct)
    assert 0 < sum(sum(c) for c in expect.values()) < sum(len(c) for c in expect.values())
    assert first["pooled_val_exact_match"] == first["pooled_metric"] == \
        sum(map(sum, expect.values())) / sum(map(len, expect.values()))  # over all answers, as the paper pools
    # The decisions follow the exact-match curves: the best evaluation of each excluded task, the
    # roll-back targets, the final model (training moves the answers away from the model's own).
    _assert_consistent(history)
    assert history["metric"] == "val_exact_match" and history["higher_is_better"]
    assert any(e["tasks"]["own_pc"]["val_exact_match"] < 0.5 for e in history["evals"][1:])
    assert history["stages"][0]["excluded"] is not None
    # Evaluations cost the packed pass plus generation, and their time includes it.
    gen0 = first["generation"]
    assert gen0["tokens"] >= sum(map(len, expect.values())) and gen0["flops"] > 0 and gen0["seconds"] > 0
    packed = first["eval_flops"] - gen0["flops"]
    for before, e in zip(history["evals"], history["evals"][1:]):
        assert e["eval_flops"] - before["eval_flops"] == packed + e["generation"]["flops"]
    totals = history["totals"]
    assert totals["generation_flops"] == sum(e["generation"]["flops"] for e in history["evals"])
    assert totals["generated_tokens"] == sum(e["generation"]["tokens"] for e in history["evals"])
    assert totals["eval_seconds"] >= totals["generation_seconds"] > 0
    setup = history["exact_match"]
    assert setup["gather"] == "once" and setup["max_new_tokens"] == dict.fromkeys(expect, MAX_NEW)
    assert setup["answer_pattern"]["pattern"] == "(?s)^(.{3})" and setup["stop_tokens"] == ["</s>", "<|end|>"]
    assert history["final"]["pooled_val_exact_match"] == history["evals"][history["final"]["eval_id"]][
        "pooled_val_exact_match"]


@pytest.mark.slow
def test_sro_and_sft_read_peaks_and_pick_their_final_model_by_exact_match(tmp_path, known_tasks,
                                                                          answering_model_dir):
    """SRO and SFT select by the same exact-match scores as mSFT: each excluded task's peak is its
    best probe evaluation by exact match (the latest of equal bests), and the final model is the evaluation with the best pooled
    exact match (over all answers), earliest on ties."""
    entries, _ = known_tasks
    history = _run(tmp_path, entries, f"model.path={answering_model_dir}", "method=sro", "train.epochs=0.5",
                   "msft.evals_per_epoch=4")
    assert history["metric"] == "val_exact_match" and history["higher_is_better"]
    for e in history["evals"]:
        assert e["pooled_metric"] == e["pooled_val_exact_match"]
        assert all(t["metric"] == t["val_exact_match"] for t in e["tasks"].values())
    probe, *schedule = history["stages"]
    probe_evals = [e for e in history["evals"] if e["stage"] == 0]
    for task, peak in probe["peak_evals"].items():  # the latest of the probe's best exact matches
        assert peak == max(probe_evals, key=lambda e: (e["tasks"][task]["val_exact_match"], e["eval_id"]))["eval_id"]
    assert [s["excluded"] for s in schedule if s["excluded"]] == sorted(
        (t for t, i in probe["peak_evals"].items() if i < probe["end_eval"]),
        key=lambda t: (probe["peak_evals"][t], history["tasks"].index(t)))
    assert history["sro"]["second_pass"], "training moves the answers away from the model's own: a task peaks early"
    candidates = [e for e in history["evals"] if e["stage"] >= 1] + [history["evals"][probe["start_eval"]]]
    best = max(candidates, key=lambda e: (e["pooled_val_exact_match"], -e["eval_id"]))
    assert history["final"]["eval_id"] == best["eval_id"]
    assert history["final"]["pooled_val_exact_match"] == best["pooled_val_exact_match"]

    # SFT: the evaluation with the best pooled exact match, not the best loss (they differ here:
    # training lowers the loss while it moves the answers away from the model's own).
    sft = _run(tmp_path / "sft", entries, f"model.path={answering_model_dir}", "method=sft", "train.epochs=0.5",
               "msft.evals_per_epoch=4")
    by_em = max(sft["evals"], key=lambda e: (e["pooled_val_exact_match"], -e["eval_id"]))["eval_id"]
    assert by_em != min(sft["evals"], key=lambda e: (e["pooled_val_loss"], e["eval_id"]))["eval_id"]
    assert sft["final"]["eval_id"] == by_em
    assert sft["final"]["pooled_metric"] == sft["final"]["pooled_val_exact_match"] == sft["evals"][by_em][
        "pooled_val_exact_match"]


def test_generation_from_a_plain_module_without_fsdp2_gives_the_plain_models_tokens(tokenizer):
    """One CPU process in fp32 trains a plain module (train.fsdp=auto): both gather modes must still
    generate from it, and leave its own weights in place."""
    from msft_fast.runtime.distributed import init_distributed, parallelize, shutdown_distributed
    from msft_fast.training.generation import ShardedGenerator
    from msft_fast.model import CausalLMWithTaskLoss, decoder_blocks

    ctx = init_distributed()
    try:
        lm, plain = tiny_llama(tokenizer, seed=3), tiny_llama(tokenizer, seed=3)
        wrapper = CausalLMWithTaskLoss(lm, 1)
        parallelize(wrapper, decoder_blocks(lm), torch.float32, ctx.device)
        assert not any(isinstance(p, torch.distributed.tensor.DTensor) for p in wrapper.parameters())
        prompts = [tokenizer(t)["input_ids"] for t in ["Uppercase: abc", "12+34="]]
        stops = [tokenizer.eos_token_id]
        want = [plain.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, eos_token_id=stops,
                               pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist() for p in prompts]
        want = [w[: next((i + 1 for i, t in enumerate(w) if t in stops), len(w))] for w in want]
        for mode in ("once", "per_forward"):
            gen = ShardedGenerator(wrapper, torch.float32, ctx.device, world_size=1)
            gen.choose(mode, batch_tokens=256, reserved_bytes=0, ranks_per_host=1)
            with gen.session() as generate:
                assert generate(prompts, 5, stops, tokenizer.pad_token_id) == want, mode
        for (name, p), q in zip(lm.named_parameters(), plain.parameters()):
            assert p.device.type == "cpu" and torch.equal(p, q), name
    finally:
        shutdown_distributed()
