"""Tiny random-init models of the families users fine-tune, built here with no download: a config
(2 layers, hidden size 32), a byte-level BPE tokenizer trained on the spot with the family's
special tokens, and a chat template in the family's style WITHOUT {% generation %} marks.

`expected_trained_text` writes out, per family and independently of any template code, the text
each assistant turn must train; tests compare the trained labels against it.
"""
from __future__ import annotations

import os
import random

import torch
from conftest import write_jsonl

SYSTEM = "You answer in one word."

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)

# Renders as Qwen3's official template does (tools left out): the assistant turn after the last user
# message gets a <think> block, empty when it has no reasoning; earlier turns are rendered without one.
QWEN3_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# The same with {% generation %} marks around each answer and its <|im_end|> (the newline after it
# is not trained): a training template to give as data.chat_template.
QWEN3_GENERATION_TEMPLATE = QWEN3_TEMPLATE.replace(
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n",
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- generation %}\n").replace(
    "        {{- '<|im_end|>\\n' }}\n",
    "        {{- '<|im_end|>' }}\n        {%- endgeneration %}\n        {{- '\\n' }}\n")

LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Gemma's template refuses a system message and non-alternating roles through raise_exception.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

OLMO2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)

# family: (special tokens, bos, eos, pad, template, system messages allowed)
FAMILIES = {
    "qwen2.5": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
                QWEN25_TEMPLATE, True),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], None, "<|im_end|>",
              "<|endoftext|>", QWEN3_TEMPLATE, True),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|finetune_right_pad_id|>"], "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
               LLAMA3_TEMPLATE, True),
    "gemma2": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>",
               GEMMA2_TEMPLATE, False),
    "olmo2": (["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"], "<|endoftext|>",
              "<|endoftext|>", "<|pad|>", OLMO2_TEMPLATE, True),
}


def expected_trained_text(family: str, messages: list[dict], empty_think_blocks: str = "train") -> list[str]:
    """What each assistant turn trains, written out from the family's chat format: the turn's
    content and its end-of-turn marker (plus, for ChatML and Gemma, the newline after it; Qwen3's
    last answer starts with an empty think block)."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        c = m["content"]
        if family == "qwen2.5":
            out.append(f"{c}<|im_end|>\n")
        elif family == "qwen3":
            think = "<think>\n\n</think>\n\n" if i > last_user and empty_think_blocks == "train" else ""
            out.append(f"{think}{c}<|im_end|>\n")
        elif family == "llama3":
            out.append(f"{c.strip()}<|eot_id|>")
        elif family == "gemma2":
            out.append(f"{c.strip()}<end_of_turn>\n")
        elif family == "olmo2":
            out.append(f"{c}<|endoftext|>")
        else:
            raise KeyError(family)
    return out


def conversations(family: str, n: int, seed: int, task: str) -> list[dict]:
    """`n` rows of one task: `arith` (two rounds: a sum, then the same sum doubled) or `words`
    (one round: a word reversed), with a system message where the family allows one."""
    rng = random.Random(f"{family}-{task}-{seed}")
    system = FAMILIES[family][5]
    rows = []
    for _ in range(n):
        if task == "arith":
            a, b = rng.randint(1, 40), rng.randint(1, 40)
            msgs = [{"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a + b}"},
                    {"role": "user", "content": "And twice that?"},
                    {"role": "assistant", "content": f"{2 * (a + b)}"}]
        else:
            word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 7)))
            msgs = [{"role": "user", "content": f"Reverse {word}"}, {"role": "assistant", "content": word[::-1]}]
        if system and rng.random() < 0.5:
            msgs = [{"role": "system", "content": SYSTEM}] + msgs
        rows.append({"messages": msgs})
    return rows


def family_tokenizer(family: str, corpus: list[str]):
    """A byte-level BPE (about 400 tokens) trained on `corpus`, with the family's special tokens
    and chat template, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, template, _ = FAMILIES[family]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=template)


def family_config(family: str, tokenizer):
    """A 2-layer random-init config of the family (hidden 32, 4 heads, 2 KV heads, head_dim 8)."""
    from transformers import Gemma2Config, LlamaConfig, Olmo2Config, Qwen2Config, Qwen3Config

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, **ids)
    if family == "qwen2.5":
        return Qwen2Config(tie_word_embeddings=True, **common)
    if family == "qwen3":
        return Qwen3Config(head_dim=8, tie_word_embeddings=False, **common)
    if family == "llama3":
        return LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=True,
                           **common)
    if family == "gemma2":
        # A window shorter than the documents, so the sliding layer really differs from the global one.
        return Gemma2Config(head_dim=8, query_pre_attn_scalar=8, sliding_window=12, final_logit_softcapping=30.0,
                            attn_logit_softcapping=50.0, tie_word_embeddings=True, **common)
    if family == "olmo2":
        return Olmo2Config(tie_word_embeddings=False, **common)
    raise KeyError(family)


def build_family(family: str, folder, data_dir, n_train: int = 24, n_val: int = 8, seed: int = 0) -> dict:
    """Write a model folder (config, safetensors, tokenizer) and two chat tasks (arith, words) for
    `family`; returns {task: (train.jsonl, val.jsonl)}."""
    from transformers import AutoModelForCausalLM

    tasks = {}
    corpus = []
    for task in ("arith", "words"):
        train = conversations(family, n_train, seed, task)
        val = conversations(family, n_val, seed + 1, task)
        tasks[task] = (write_jsonl(os.path.join(data_dir, task, "train.jsonl"), train),
                       write_jsonl(os.path.join(data_dir, task, "val.jsonl"), val))
        corpus += [m["content"] for row in train + val for m in row["messages"]]
    template = FAMILIES[family][4]
    corpus += [template, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
               "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n", "system user assistant model"]
    tokenizer = family_tokenizer(family, corpus)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tokenizer), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tasks
