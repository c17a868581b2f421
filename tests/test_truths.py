"""The code does what it says: the merge gate checks what eval loads, an over-long eval prompt is still a question,
execution settings keep the training, the bench's reference row is the reference, the training speed counts
training steps only, and a SageMaker job reads its channel and writes its model directory."""
from __future__ import annotations

import importlib
import json
import shutil

import pytest
from conftest import REPO, make

from common.core import config, paths, schema, stamps
from common.data import prompts
from common.model import arch, modeling, standins
from common.training import plan as run_plan

RUN = "outputs/smollm2-tiny"


# --------------------------------------------------------------------------- one tiny run, shared
@pytest.fixture(scope="module")
def sagemaker_run(tmp_path_factory, model_cache):
    """A tiny smollm2 training run launched as a SageMaker job would be: the data in SM_CHANNEL_TRAINING, the
    model to SM_MODEL_DIR."""
    root = tmp_path_factory.mktemp("sm")
    home, channel, model_dir = root / "home", root / "channel", root / "model"
    home.mkdir()
    channel.mkdir()
    shutil.copy(REPO / "data/sample/trn.json", channel / "trn.json")
    make(home, "train", "RECIPE=smollm2", "TINY=1", FT_CACHE=str(model_cache), SM_CHANNEL_TRAINING=str(channel),
         SM_MODEL_DIR=str(model_dir), HF_HUB_OFFLINE="1")
    return home, channel, model_dir


@pytest.mark.e2e
def test_a_sagemaker_job_reads_its_channel_and_writes_its_model_dir(sagemaker_run):
    home, channel, model_dir = sagemaker_run
    prep = json.loads((home / "data/processed/smollm2-tiny/prepare_report.json").read_text())
    assert prep["source"] == str(channel / "trn.json"), prep["source"]
    assert (model_dir / "adapter_config.json").is_file() and (model_dir / "adapter_model.safetensors").is_file()
    assert (model_dir / "adapter_model.safetensors").read_bytes() == \
        (home / RUN / "adapter/adapter_model.safetensors").read_bytes()


@pytest.mark.e2e
def test_training_speed_counts_the_tokens_of_training_steps_over_their_time_only(sagemaker_run):
    """Evaluations (every 2 steps in tiny mode) and checkpoint saves are left out of the time; the tokens are the
    non-padding tokens the training micro-batches carried (4 steps x 4 examples here)."""
    home = sagemaker_run[0]
    info = json.loads((home / RUN / "adapter/run_info.json").read_text())
    rows = [json.loads(x) for x in (home / "data/processed/smollm2-tiny/train.jsonl").read_text().splitlines()]
    assert info["global_step"] == 4 and 0 < info["step_seconds"] < info["train_seconds"], info
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(home / RUN / "adapter")
    cfg = config.load("smollm2", tiny=True)
    lengths = sorted(len(arch.get(cfg).encode_train(cfg, tok, r)[0]) for r in rows)
    seen = 4 * cfg.train.batch_size  # examples the 4 steps trained on
    assert sum(lengths[:seen]) <= info["trained_tokens"] <= sum(lengths[-seen:]), info["trained_tokens"]
    assert info["train_tokens_per_second"] == pytest.approx(info["trained_tokens"] / info["step_seconds"], rel=0.02)


@pytest.mark.e2e
def test_the_merge_gate_checks_the_merged_model_as_eval_loads_it(sagemaker_run, model_cache, monkeypatch):
    """Eval and the demo load merged/ with modeling.load_merged (bf16 on a GPU); the gate must check that same
    artifact. Here eval's dtype is set to bf16 (merged/ is saved in fp16), and the model the gate compares must be
    the bf16 one: neither the merge's working dtype nor the saved file's."""
    import torch

    from common.shipping import parity

    home = sagemaker_run[0]
    monkeypatch.setenv("FT_HOME", str(home))
    monkeypatch.setenv("FT_CACHE", str(model_cache))
    monkeypatch.setattr(modeling, "inference_dtype", lambda: "bf16")
    seen = []
    real = parity.teacher_forced
    monkeypatch.setattr(parity, "teacher_forced", lambda model, inputs: seen.append(next(model.parameters()).dtype)
                        or real(model, inputs))
    merge = importlib.import_module("scripts.03_merge_fp16")
    assert merge.main(["--recipe", "smollm2", "--tiny", "--set", "merge.min_token_agreement=0",
                       "--set", "merge.min_answer_match=0"]) == 0
    assert seen == [torch.float32, torch.bfloat16], seen  # the adapter model (fp32 on this CPU), then merged/ in bf16
    report = json.loads((home / RUN / "merge_report.json").read_text())
    assert report["checked_in"] == "bf16"


# --------------------------------------------------------------------------- eval prompts
@pytest.fixture(scope="module")
def tok(model_cache):
    import os

    from transformers import AutoTokenizer

    os.environ.setdefault("FT_CACHE", str(model_cache))
    t = AutoTokenizer.from_pretrained(standins.smollm2_tokenizer_dir())
    from common.data.templates import TEMPLATES

    t.chat_template = TEMPLATES["chatml"]
    return t


def test_an_overlong_eval_prompt_keeps_its_chat_framing_and_loses_the_end_of_its_content(tok, ft_home):
    cfg = config.load("smollm2", ["train.max_length=40"])
    a = arch.get(cfg)
    title = " ".join(f"word{i}" for i in range(200))
    ex = a.build(cfg, {"title": title, "content": "x"})
    header = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    ids = a.encode_prompt(cfg, tok, ex)
    assert len(ids) <= 40 and ids[-len(header):] == header, tok.decode(ids)
    text = tok.decode(ids)
    assert "Title: word0 word1" in text and "word199" not in text
    assert a.prompt_truncated(cfg, tok, ex)
    short = a.build(cfg, {"title": "a lamp", "content": "x"})
    assert not a.prompt_truncated(cfg, tok, short) and a.encode_prompt(cfg, tok, short) == \
        prompts.encode_prompt(tok, short["prompt"])


def test_an_overlong_multi_turn_prompt_drops_its_oldest_turns_first(tok):
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"question {i} " + "filler " * 10},
                 {"role": "assistant", "content": f"answer {i}"}]
    msgs.append({"role": "user", "content": "the last question"})
    ids, cut = prompts.fit_prompt(tok, msgs, 90)
    text = tok.decode(ids)
    assert cut and len(ids) <= 90 and text.startswith("<|im_start|>system\nBe brief.")
    assert "the last question" in text and "question 0" not in text and text.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="chat framing alone is longer than max_length=5"):
        prompts.fit_prompt(tok, msgs, 5)


# --------------------------------------------------------------------------- what changes the result
RUNTIME_CHANGES = {"micro_batch": 2, "gpu_memory_gb": 12, "padding_free": True, "varlen_attention": True,
                   "liger": True, "threads": 1, "answer_only_logits": False, "logging_steps": 3,
                   "save_total_limit": 5, "eval_bleu": True, "report_to": "tensorboard", "probe_from_plan": True}


def test_runtime_settings_keep_the_checkpoints_and_train_settings_discard_them(ft_home):
    """An interrupted run resumed with another logging, tracker, micro-batch, kernel or thread setting keeps its
    checkpoints (and Make's train stamp does not change); a changed learning rate starts fresh."""
    train = importlib.import_module("scripts.02_sft_qlora")
    assert set(RUNTIME_CHANGES) == set(schema.SCHEMA["runtime"])  # every runtime key is tried
    cfg = config.load("smollm2", tiny=True)
    rp = paths.RunPaths(cfg.run)
    rp.data.mkdir(parents=True)
    for split in ("train", "val"):
        rp.split(split).write_text('{"id": 1}\n')
    ck = train.checkpoint_key
    assert train.resumable_checkpoint(cfg, rp, ck(cfg, rp)) is None
    ckpt = rp.checkpoints / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    for key, value in RUNTIME_CHANGES.items():
        changed = config.load("smollm2", [f"runtime.{key}={json.dumps(value)}"], tiny=True)
        assert changed.runtime[key] != cfg.runtime[key], key
        assert stamps.step_settings(changed, "train") == stamps.step_settings(cfg, "train"), key
        assert train.resumable_checkpoint(changed, rp, ck(changed, rp)) == str(ckpt), key
    lr = config.load("smollm2", ["train.learning_rate=0.123"], tiny=True)
    assert stamps.step_settings(lr, "train") != stamps.step_settings(cfg, "train")
    assert train.resumable_checkpoint(lr, rp, ck(lr, rp)) is None and not ckpt.exists()


def test_a_changed_chat_template_or_a_finished_checkpoint_never_resumes(ft_home):
    """The splits hold messages, so a changed prompt.template leaves them as they were: the checkpoint key holds
    prepare's settings and the encoded tokens (a template changed inside the tokenizer too), and the run starts
    fresh. A checkpoint at the schedule's end (HF saves one at the last step) is not resumed either: resuming it
    would train 0 steps."""
    from common.training import builder

    train = importlib.import_module("scripts.02_sft_qlora")
    cfg = config.load("smollm2", tiny=True)
    rp = paths.RunPaths(cfg.run)
    rp.data.mkdir(parents=True)
    rows = [arch.get(cfg).build(cfg, {"title": "Steel pan", "content": "A pan."})]
    for split in ("train", "val"):
        rp.split(split).write_text(json.dumps(rows[0]) + "\n")

    def key(c):
        tok = modeling.load_tokenizer(c, modeling.model_source(c))
        enc = builder.encode_split(c, tok, rows, "train")
        return train.checkpoint_key(c, rp, enc, enc)

    def checkpoint(step: int, end: int):
        d = rp.checkpoints / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": end}))
        return str(d)

    assert train.resumable_checkpoint(cfg, rp, key(cfg)) is None
    ckpt = checkpoint(2, 4)
    assert train.resumable_checkpoint(cfg, rp, key(cfg)) == ckpt
    other = config.load("smollm2", ["prompt.template=zephyr"], tiny=True)
    assert stamps.step_settings(other, "train") == stamps.step_settings(cfg, "train")  # Make's prepare stamp alone
    assert train.resumable_checkpoint(other, rp, key(other)) is None and not (rp.checkpoints / "checkpoint-2").exists()
    # the same settings, and a tokenizer that renders otherwise (a native chat template updated in place): fresh
    checkpoint(2, 4)
    tok = modeling.load_tokenizer(other, modeling.model_source(other))
    tok.chat_template = tok.chat_template.replace("<|assistant|>", "<|bot|>")
    moved = builder.encode_split(other, tok, rows, "train")
    assert train.resumable_checkpoint(other, rp, train.checkpoint_key(other, rp, moved, moved)) is None
    assert train.resumable_checkpoint(other, rp, key(other)) is None  # a run of these settings starts
    checkpoint(2, 4)
    assert train.resumable_checkpoint(other, rp, key(other)) == str(rp.checkpoints / "checkpoint-2")
    last = checkpoint(4, 4)  # the finished run's last save
    assert train.resumable_checkpoint(other, rp, key(other)) is None and not (rp.checkpoints / "checkpoint-4").exists()
    assert not (rp.checkpoints / "checkpoint-2").exists() and not (rp.checkpoints / last).exists()


# --------------------------------------------------------------------------- the bench's reference row
@pytest.mark.parametrize("recipe", ["smollm2", "tinyllama"])  # tinyllama: 4-bit through peft's kbit preparation
def test_the_bench_reference_row_uses_none_of_our_speed_choices(recipe, ft_home, tmp_path):
    """The reference row is HF Trainer + PEFT as the reference notebooks load it: PEFT's own LoRA dropout (no
    CheapDropout), frozen float weights in fp32, every example padded to 512 tokens, loss on every token."""
    import torch

    from common.measurement import bench_rows as bench

    cfg = config.load(recipe, ["lora.dropout=0.1"], tiny=True)
    plan = run_plan.resolve(cfg)
    a = arch.get(cfg)
    rows = [a.build(cfg, {"title": f"lamp {i}", "content": f"a lamp numbered {i}"}) for i in range(4)]
    trainer = bench.build_reference(cfg, plan, rows, str(tmp_path))
    drops = [m for m in trainer.model.modules() if "Dropout" in type(m).__name__]
    assert drops and {type(m) for m in drops} == {torch.nn.Dropout}, {type(m).__name__ for m in drops}
    assert {p.dtype for p in trainer.model.parameters() if p.is_floating_point()} == {torch.float32}
    assert (plan.quant_bits == 4) == any(p.dtype == torch.uint8 for p in trainer.model.parameters())
    assert type(trainer).__name__ == "Trainer" and not hasattr(trainer, "trained_tokens")
    batch = trainer.train_dataset[0]
    assert len(batch["input_ids"]) == bench.REFERENCE_LENGTH
    assert all(x != -100 for x, m in zip(batch["labels"], batch["attention_mask"]) if m)


def test_every_setting_that_defines_a_result_is_in_the_stamp_of_a_step_that_uses_it(ft_home):
    """A changed setting re-runs the steps it affects (Make compares the stamps) and nothing else: every key of
    every section but `runtime`, `sweep` and the description lands in some step's stamp, and no runtime key does.
    The keys only `make push` reads are read each time it runs (it has no stamp)."""
    push_only = {"card.repo_id", "card.push", "card.private"}
    base = config.load("smollm2", tiny=True)
    stamped = lambda cfg: {s: stamps.step_settings(cfg, s) for s in stamps.STEP_KEYS}  # noqa: E731
    before = stamped(base)
    for section, keys in schema.SCHEMA.items():
        if section in ("description", "task") or not isinstance(keys, dict):
            continue
        for key in keys:
            covered = any(k == section or k == f"{section}.{key}" for s in stamps.STEP_KEYS.values() for k in s)
            assert covered == (section not in ("runtime", "sweep") and f"{section}.{key}" not in push_only), \
                f"{section}.{key}"  # the sweep section names runs (make sweep); it defines none
    assert stamped(config.load("smollm2", ["runtime.threads=1", "runtime.report_to=tensorboard"], tiny=True)) == before
    assert stamped(config.load("smollm2", ["lora.r=4"], tiny=True))["train"] != before["train"]
