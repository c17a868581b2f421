"""The architecture seam: decoder-only (causal) vs encoder-decoder (seq2seq, T5), decided here and nowhere else.

An `Arch` knows the model class, the PEFT task type, how a record's fields become a prompt and an answer, how a
training example and a generation prompt are encoded (both within train.max_length: a training example is cut at
the end and dropped when no answer token is left; a generation prompt keeps its whole chat framing and loses the
end of its user content, so the model is still asked to answer), and the padding side for batched generation.
Train, merge, eval, demo and bench call `arch.get(cfg)` and never test the name; the trainer of each architecture
is the training stage's (common/training/trainers.py, keyed by `Arch.name`).

Causal: chat messages rendered by the tokenizer's chat template (common/data/prompts.py: labels -100 on every
prompt token, the answer and its EOS trained). Seq2seq: the prompt text is the encoder input, the answer text the
labels. T5 overflows in fp16 (loss 0/NaN), so fp16 is replaced for it.
"""
from __future__ import annotations

import logging
from typing import Any

from common.core.io import UserError
from common.data import conversations, prompts
from common.data.templates import TEMPLATES

log = logging.getLogger("ft")


def fill(template: str, fields: dict, where: str) -> str:
    """template.format_map(fields), with a one-line error naming the setting when a field is unknown."""
    try:
        return template.format_map(fields)
    except KeyError as e:
        raise UserError(f"{where} uses {{{e.args[0]}}}, which this record does not have; fields: "
                        f"{', '.join(sorted(fields))}") from None


def end_of_turn(tok: Any) -> str | None:
    """The special token the chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`, `<|end|>`,
    or EOS itself), or None when the turn ends on plain text."""
    probe = "\x00ANSWER\x00"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}]
    try:
        text = tok.apply_chat_template(msgs, tokenize=False)
    except Exception:  # noqa: BLE001 (a template that refuses this chat raises its own exception types)
        return None
    tail = text.split(probe, 1)[1] if probe in text else ""
    specials = sorted((t.content for t in tok.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    return next((t for t in specials if tail.startswith(t)), None)


def stop_on_end_of_turn(tok: Any) -> None:
    """Make the token that ends an assistant turn the tokenizer's EOS, the token trained after each answer and the one
    generation stops on. A base checkpoint's EOS (Qwen's `<|endoftext|>`, Llama-3's `<|end_of_text|>`) is not what
    its chat template ends a turn with (`<|im_end|>`, `<|eot_id|>`); trained on the template with the wrong one, a
    model never stops. The Instruct checkpoints of Qwen2.5/3 already say so; Phi-3.5 (`<|end|>`) does not."""
    eot = end_of_turn(tok)
    if eot and eot != tok.eos_token:
        log.info("the chat template ends a turn on %s, not on the tokenizer's EOS %s: %s is the stop token", eot,
                 tok.eos_token, eot)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token  # padding stays what it was
        tok.eos_token = eot


class Arch:
    name = ""
    peft_task_type = ""
    fp16_safe = True
    padding_side = "left"  # batched generation
    echoes_prompt = True  # generate() returns prompt + answer (decoder-only) or the answer alone (seq2seq)
    chat_baselines = True  # make bench compares with plain TRL SFT and the padded reference (decoder-only setups)
    labels_apart = False  # the labels are a separate sequence (seq2seq's decoder) rather than the input's own ids

    def model_class(self) -> Any:
        raise NotImplementedError

    def load_kwargs(self, cfg: Any) -> dict:
        return {}

    def prepare_tokenizer(self, cfg: Any, tok: Any, source: str) -> None:
        """Give the tokenizer what the recipe asks (e.g. a chat template)."""

    def build(self, cfg: Any, fields: dict, history: list[dict] | None = None) -> dict:
        """{'prompt', 'completion'} of one processed example from a record's fields (history: earlier records)."""
        raise NotImplementedError

    def encode_train(self, cfg: Any, tok: Any, ex: dict) -> tuple[list[int], list[int]] | None:
        """(input ids, labels) of a training example; None when truncation leaves no answer token."""
        raise NotImplementedError

    def trained_tokens(self, cfg: Any, tok: Any, ex: dict, last_only: bool) -> tuple[str | None, int, int]:
        """(why the example would train nothing, else None; its trained tokens; its tokens) within train.max_length,
        for prepare's drop check. last_only: only the last answer counts (a test row: the answer evaluated)."""
        enc = self.encode_train(cfg, tok, ex)
        return ("no_trained_token", 0, 0) if enc is None else (None, sum(x != prompts.IGNORE for x in enc[1]),
                                                                 len(enc[0]) + (len(enc[1]) if self.labels_apart else 0))

    def encode_prompt(self, cfg: Any, tok: Any, ex: dict) -> list[int]:
        """The ids generation starts from, within train.max_length."""
        raise NotImplementedError

    def prompt_truncated(self, cfg: Any, tok: Any, ex: dict) -> bool:
        """Whether encode_prompt had to shorten this example's prompt to fit train.max_length."""
        raise NotImplementedError

    def length(self, tok: Any, ex: dict) -> int:
        """Untruncated tokens of prompt + answer (prepare's length statistics)."""
        raise NotImplementedError

    def forward_inputs(self, cfg: Any, tok: Any, ex: dict) -> dict:
        """Model inputs for a whole example (prompt and answer): the merge check compares logits on these."""
        raise NotImplementedError


class Causal(Arch):
    name = "causal"
    peft_task_type = "CAUSAL_LM"

    def model_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def load_kwargs(self, cfg: Any) -> dict:
        return {"attn_implementation": cfg.model.attn_implementation}

    def prepare_tokenizer(self, cfg: Any, tok: Any, source: str) -> None:
        name = cfg.prompt.template
        if name != "native":
            if name not in TEMPLATES:
                raise UserError(f"prompt.template '{name}' is unknown; choose native or one of {', '.join(TEMPLATES)}")
            tok.chat_template = TEMPLATES[name]
        elif not tok.chat_template:
            raise UserError(f"{source} has no chat template; set prompt.template (e.g. chatml or alpaca)")
        elif "enable_thinking" in tok.chat_template:
            raise UserError(f"{source}'s own chat template (Qwen3 thinking) rewrites earlier turns, so training would "
                            "not see each turn as served; set prompt.template: qwen3 (non-thinking, as served)")
        stop_on_end_of_turn(tok)

    def build(self, cfg: Any, fields: dict, history: list[dict] | None = None) -> dict:
        p = cfg.prompt
        if "messages" in fields:  # a conversation (task chat): cut before its last assistant turn
            turns = fields["messages"]
            system = [{"role": "system", "content": p.system}] if p.system and turns[0]["role"] != "system" else []
            return {"prompt": system + turns[:-1], "completion": turns[-1:]}
        msgs: list[dict] = [{"role": "system", "content": p.system}] if p.system else []
        for h in history or []:
            msgs += [{"role": "user", "content": fill(p.user, h, "prompt.user")},
                     {"role": "assistant", "content": fill(p.target, h, "prompt.target")}]
        msgs.append({"role": "user", "content": fill(p.user, fields, "prompt.user")})
        return {"prompt": msgs, "completion": [{"role": "assistant", "content": fill(p.target, fields, "prompt.target")}]}

    def encode_train(self, cfg: Any, tok: Any, ex: dict) -> tuple[list[int], list[int]] | None:
        return prompts.encode_chat(tok, ex["prompt"], ex["completion"], cfg.train.max_length,
                                   all_turns=cfg.train.loss_on == "assistant_turns")

    def trained_tokens(self, cfg: Any, tok: Any, ex: dict, last_only: bool) -> tuple[str | None, int, int]:
        why = conversations.unrenderable(tok, [*ex["prompt"], *ex["completion"]])
        enc = None if why else prompts.encode_chat(tok, ex["prompt"], ex["completion"], cfg.train.max_length,
                                                   all_turns=cfg.train.loss_on == "assistant_turns" and not last_only)
        if enc is None:
            return why or "no_trained_token", 0, 0
        return None, sum(x != prompts.IGNORE for x in enc[1]), len(enc[0])

    def encode_prompt(self, cfg: Any, tok: Any, ex: dict) -> list[int]:
        return prompts.fit_prompt(tok, ex["prompt"], cfg.train.max_length)[0]

    def prompt_truncated(self, cfg: Any, tok: Any, ex: dict) -> bool:
        return prompts.fit_prompt(tok, ex["prompt"], cfg.train.max_length)[1]

    def length(self, tok: Any, ex: dict) -> int:
        enc = prompts.encode_chat(tok, ex["prompt"], ex["completion"], None, True)
        return len(enc[0]) if enc else 0

    def forward_inputs(self, cfg: Any, tok: Any, ex: dict) -> dict:
        enc = prompts.encode_chat(tok, ex["prompt"], ex["completion"], cfg.train.max_length, True)
        return {"input_ids": enc[0]} if enc else {}


class Seq2Seq(Arch):
    name = "seq2seq"
    peft_task_type = "SEQ_2_SEQ_LM"
    fp16_safe = False  # T5 overflows in fp16: loss 0/NaN
    padding_side = "right"  # the encoder reads the prompt; the decoder starts fresh
    echoes_prompt = False
    chat_baselines = False
    labels_apart = True

    def model_class(self) -> Any:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def build(self, cfg: Any, fields: dict, history: list[dict] | None = None) -> dict:
        return {"prompt": fill(cfg.prompt.user, fields, "prompt.user"),
                "completion": fill(cfg.prompt.target, fields, "prompt.target")}

    def encode_train(self, cfg: Any, tok: Any, ex: dict) -> tuple[list[int], list[int]] | None:
        return prompts.encode_seq2seq(tok, ex["prompt"], ex["completion"], cfg.train.max_length,
                                      cfg.train.max_target_length)

    def encode_prompt(self, cfg: Any, tok: Any, ex: dict) -> list[int]:
        return tok(ex["prompt"], max_length=cfg.train.max_length, truncation=True).input_ids  # keeps the EOS

    def prompt_truncated(self, cfg: Any, tok: Any, ex: dict) -> bool:
        return len(tok(ex["prompt"]).input_ids) > cfg.train.max_length

    def length(self, tok: Any, ex: dict) -> int:
        return len(tok(ex["prompt"]).input_ids) + len(tok(text_target=ex["completion"]).input_ids)

    def forward_inputs(self, cfg: Any, tok: Any, ex: dict) -> dict:
        src, tgt = self.encode_train(cfg, tok, ex)
        return {"input_ids": src, "labels": tgt}


ARCHS: dict[str, Arch] = {"causal": Causal(), "seq2seq": Seq2Seq()}


def get(cfg: Any) -> Arch:
    return ARCHS[cfg.model.arch]
