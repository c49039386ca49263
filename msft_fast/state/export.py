"""Write the trained model as a HF model folder (safetensors, config, tokenizer).

`AutoModelForCausalLM.from_pretrained` and inference servers load it as is. The folder appears
atomically: it is written beside its final name and renamed when complete.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from msft_fast.state.atomic_io import apply_default_mode, replace_dir_atomic
from msft_fast.runtime.fault_injection import fault_point

WRAPPER_PREFIX = "lm."  # CausalLMWithTaskLoss keeps the HF model as `.lm`


def export_hf_folder(wrapper: nn.Module, tokenizer: Any, out_dir: str, is_main: bool, dtype: torch.dtype) -> None:
    """Gather full weights onto rank 0's CPU (a collective: every rank calls this) and save them."""
    lm = wrapper.lm
    state = get_model_state_dict(wrapper, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return
    # Tied weights (e.g. lm_head = embed_tokens) are saved once, under the first name, as HF does.
    unique = {n for n, _ in lm.named_parameters()} | {n for n, _ in lm.named_buffers()}
    state = {
        k[len(WRAPPER_PREFIX):]: v.to(dtype).contiguous()
        for k, v in state.items()
        if k.startswith(WRAPPER_PREFIX) and k[len(WRAPPER_PREFIX):] in unique
    }
    tmp = out_dir.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    _save_safetensors(state, tmp)
    fault_point("export")  # weights written, config and tokenizer not yet
    lm.config.save_pretrained(tmp)
    if getattr(lm, "generation_config", None) is not None and lm.can_generate():
        lm.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir_atomic(tmp, out_dir)


def _save_safetensors(state: dict[str, torch.Tensor], folder: str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size="5GB")
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, os.path.join(folder, filename), metadata={"format": "pt"})
        apply_default_mode(os.path.join(folder, filename))  # safetensors creates its files 0600
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
