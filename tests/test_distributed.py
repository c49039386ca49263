"""1 rank with grad_accum=2k (a plain model: train.fsdp=auto leaves FSDP2 out of one CPU process in fp32)
and 2 ranks (torchrun, gloo, FSDP2) with grad_accum=k train alike, and
every FSDP unit reduces its gradients once per optimizer step (train.grad_sync=step), or once per
micro-batch when asked (train.grad_sync=micro_batch). Both sides run through
tests/count_grad_reductions.py, which counts each step's reductions on each rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import kill_process_tree

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _write_config(tmp_path, demo_dir, model_dir, val: dict | None = None,
                  names: tuple = ("upper", "noisy_codes", "sort"), lr: float = 2.0e-3) -> str:
    val = val or {n: demo_dir / n / "val.jsonl" for n in names}
    tasks = "\n".join(f"    - {{name: {n}, train: {demo_dir / n / 'train.jsonl'}, val: {val[n]}}}" for n in names)
    path = tmp_path / "config.yaml"
    path.write_text(f"""
model: {{path: {model_dir}}}
output_dir: unused
data:
  tasks:
{tasks}
  max_seq_len: 64
  tokens_per_batch: 256
  cache_dir: {tmp_path / 'cache'}
train: {{lr: {lr}, epochs: 1, warmup_steps: 2, progress: false}}
msft: {{evals_per_epoch: 2}}
""")
    return str(path)


def _run(cmd, env) -> None:
    # A session of its own, so a hang kills torchrun's workers too, not only the launcher.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc.pid)  # torchrun's workers run in sessions of their own
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]


@pytest.mark.parametrize("method,k,two_rank_options", [
    ("sft", 2, ()),
    pytest.param("msft", 1, (), marks=pytest.mark.stack),
    # HSDP (2 replicas of 1 shard) with every other block recomputed in backward, reduce-scattering
    # after every micro-batch and all-reducing across the replicas once per step: the same maths.
    ("sft", 2, ("train.hsdp_replicas=2", "train.activation_checkpointing=selective", "train.grad_sync=micro_batch")),
], ids=["sft", "msft", "sft-hsdp-checkpointing-per-micro-batch"])
def test_two_ranks_match_one_rank_step_for_step(tmp_path, demo_dir, user_model_dir, method, k, two_rank_options):
    """For msft this also covers the snapshot pool and roll-backs with sharded state on 2 ranks."""
    config = _write_config(tmp_path, demo_dir, user_model_dir)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    counter = os.path.join(tests_dir, "count_grad_reductions.py")
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    one, two = tmp_path / "one", tmp_path / "two"
    extra = [f"method={method}", "msft.budget_epochs=0.75", "msft.max_stages=2", "msft.evals_per_epoch=4",
             "train.lr=5e-3"]
    if method == "msft":  # a scripted metric forces an exclusion with a real roll-back on any data
        extra += ["msft.metric=metric_callbacks:scripted", "msft.report_exact_match=true"]  # weights gathered once
    for folder in (one, two):
        folder.mkdir()
    _run([sys.executable, counter, "--config", config, f"output_dir={one}", f"train.grad_accum={2 * k}", *extra],
         {**env, "COUNT_DIR": str(one)})
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          counter, "--config", config, f"output_dir={two}", f"train.grad_accum={k}", *extra, *two_rank_options],
         {**env, "COUNT_DIR": str(two)})

    def metrics(folder):
        return [json.loads(line) for line in open(folder / "metrics.jsonl")]

    m1, m2 = metrics(one), metrics(two)
    assert len(m1) == len(m2) > 3
    for a, b in zip(m1, m2):
        assert (a.get("stage"), a["step"], a["tokens"], a["loss_tokens"]) == \
            (b.get("stage"), b["step"], b["tokens"], b["loss_tokens"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        for name, task in a["tasks"].items():
            assert b["tasks"][name]["tokens"] == task["tokens"]
            assert b["tasks"][name]["loss"] == pytest.approx(task["loss"], rel=1e-5)
    h1, h2 = (json.load(open(folder / "history.json")) for folder in (one, two))
    assert h2["world_size"] == 2 and h1["world_size"] == 1
    assert h1["final"]["eval_id"] == h2["final"]["eval_id"]
    assert [(st["excluded"], st["rollback_to_eval"]) for st in h1["stages"]] == \
        [(st["excluded"], st["rollback_to_eval"]) for st in h2["stages"]]
    if method == "msft":  # the roll-back happened, past the stage start, and matched
        assert h1["stages"][0]["excluded"] == "upper" and h1["stages"][0]["rollback_to_eval"] == 1
    for e1, e2 in zip(h1["evals"], h2["evals"]):
        assert e1["step"] == e2["step"] and e1["train_flops"] == e2["train_flops"]
        for name, t in e1["tasks"].items():
            assert e2["tasks"][name]["val_loss"] == pytest.approx(t["val_loss"], rel=1e-5)
            assert e2["tasks"][name]["metric"] == pytest.approx(t["metric"], rel=1e-5)
            assert e2["tasks"][name]["val_tokens"] == t["val_tokens"]
            assert e2["tasks"][name].get("val_answers_correct") == t.get("val_answers_correct")
    # Both export the same model.
    from safetensors.torch import load_file

    w1, w2 = (load_file(str(folder / "final" / "model.safetensors")) for folder in (one, two))
    assert w1.keys() == w2.keys() and "lm_head.weight" not in w1  # tied: saved once, as HF does
    for name in w1:
        assert (w1[name] - w2[name]).abs().max().item() < 1e-4, name

    # Gradient reductions per optimizer step, on every rank: each FSDP unit (2 blocks + the root)
    # reduces once per step, or once per micro-batch with train.grad_sync=micro_batch; with HSDP the
    # all-reduce across replicas runs once per step either way. One CPU rank in fp32 runs without
    # FSDP2 (train.fsdp=auto: nothing to shard), so it has no unit and no reduction.
    per_micro_batch = "train.grad_sync=micro_batch" in two_rank_options
    hsdp = "train.hsdp_replicas=2" in two_rank_options
    for folder, world, accum in ((one, 1, 2 * k), (two, 2, k)):
        for rank in range(world):
            steps = json.load(open(folder / f"rank-{rank}.json"))
            assert len(steps) == len(m1) and max(s["micro_batches"] for s in steps) == accum
            for s in steps:
                units = s["fsdp_units"]
                reductions = units * (s["micro_batches"] if per_micro_batch and folder == two else 1)
                assert units == (3 if world == 2 else 0) and s["units"] == reductions
                # 2-rank FSDP reduce-scatters once per unit reduction. A one-rank shard group (HSDP here)
                # reduce-scatters nothing on recent torch; torch 2.8 (the floor) still issues that no-op.
                if hsdp and folder == two:
                    assert s["reduce_scatters"] in (0, reductions)
                else:
                    assert s["reduce_scatters"] == (reductions if world == 2 else 0)
                assert s["all_reduces"] == (units if hsdp and folder == two else 0)


MAX_NEW = 6


@pytest.fixture(scope="module")
def known_val(tmp_path_factory, demo_dir, answering_model_dir, tokenizer):
    """Validation files of upper (chat), noisy_codes and sort whose references are the answering
    model's own greedy answers on even rows (tests/known_answers.py); and the correct rows."""
    from known_answers import known_answer_rows
    from transformers import AutoModelForCausalLM

    from conftest import write_jsonl

    model = AutoModelForCausalLM.from_pretrained(answering_model_dir).eval()
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    root, files, correct = tmp_path_factory.mktemp("known-val"), {}, {}
    for n in ("upper", "noisy_codes", "sort"):
        rows = [json.loads(line) for line in open(demo_dir / n / "val.jsonl")][:12]
        rows, _, correct[n] = known_answer_rows(model, tokenizer, rows, MAX_NEW, stops)
        files[n] = write_jsonl(root / f"{n}.jsonl", rows)
    return files, correct


def test_two_ranks_score_generated_answers_like_one_rank(tmp_path, demo_dir, answering_model_dir, known_val):
    """Exact match: each rank generates its share of the validation rows and the counts are summed;
    2 ranks gathering the weights block by block for every forward (in lockstep) count what one rank
    gathering them once counts: exactly the known answers before training, and the same after."""
    files, correct = known_val
    config = _write_config(tmp_path, demo_dir, answering_model_dir, val=files)
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["method=sft", "msft.metric=val_exact_match", f"msft.max_new_tokens={MAX_NEW}", "train.epochs=0.5",
             "msft.evals_per_epoch=4", "train.lr=2e-3", "msft.generation_tokens_per_batch=96"]
    _run([sys.executable, "-m", "msft_fast", "train", "--config", config, f"output_dir={one}", "train.grad_accum=2",
          *extra], env)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "msft_fast.train", "--config", config, f"output_dir={two}", "train.grad_accum=1", *extra,
          "msft.generation_gather=per_forward"], env)
    h1, h2 = (json.load(open(folder / "history.json")) for folder in (one, two))
    assert (h1["exact_match"]["gather"], h2["exact_match"]["gather"]) == ("once", "per_forward")
    assert h1["exact_match"]["batches"] == h2["exact_match"]["batches"] > 3  # some for each rank, unevenly
    for name, rows in correct.items():
        t = h1["evals"][0]["tasks"][name]
        assert (t["val_answers_correct"], t["val_answers"]) == (sum(rows), len(rows)), name
    assert len(h1["evals"]) == len(h2["evals"]) >= 3
    for e1, e2 in zip(h1["evals"], h2["evals"]):
        assert e2["generation"]["tokens"] == e1["generation"]["tokens"]
        assert e2["generation"]["flops"] == e1["generation"]["flops"]
        for name, t in e1["tasks"].items():
            assert (e2["tasks"][name]["val_answers_correct"], e2["tasks"][name]["val_answers"]) == \
                (t["val_answers_correct"], t["val_answers"]), (e1["eval_id"], name)
    assert h1["final"]["eval_id"] == h2["final"]["eval_id"]
