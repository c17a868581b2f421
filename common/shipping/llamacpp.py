"""A GGUF file run by a real llama.cpp: its tokenizer, its next-token logits and its greedy answers.

The runtime is llama-cpp-python (PINNED), whose wheel bundles the llama.cpp library it was built from: PyPI has
only its source, so `make llamacpp` (which `make export` and `make test` run first: scripts/00_install.py
--llamacpp) installs a wheel from the model cache's wheels/ folder or builds one there once with cmake (measured in
docs/performance.md). (The prebuilt wheels on PyPI that carry llama.cpp, e.g. llama-cpp-py-sync, need glibc 2.38;
Debian 12 has 2.36.) Unlike transformers' GGUF reader, which applies the inverse of transformers' own mapping,
it reads the file the way llama.cpp, Ollama and LM Studio do: tensor names and layouts per architecture, rope type
and scaling, token attributes by model name, end-of-generation tokens. Loaded only when asked for; `missing()` says
why it cannot be had on this machine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

PACKAGE, PINNED = "llama-cpp-python", "0.3.12"  # the same release whose sdist carries the stand-ins' vocabularies


def missing() -> str | None:
    """None when the runtime loads here, else why not (one line, with the command that installs it)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # noqa: BLE001 (a missing package or a library that does not load on this machine)
        return f"{PACKAGE} (a real llama.cpp) is not usable here ({type(e).__name__}: {e}); run make llamacpp"
    return None


def version() -> str:
    """The runtime's name and version, e.g. 'llama-cpp-python 0.3.12 (its bundled llama.cpp)'."""
    import llama_cpp

    return f"{PACKAGE} {llama_cpp.__version__} (its bundled llama.cpp, CPU)"


class Runtime:
    """One GGUF file loaded by llama.cpp on the CPU, one sequence at a time, every position's logits kept."""

    def __init__(self, path: Path, n_ctx: int = 512, threads: int | None = None):
        import llama_cpp

        self._eog = llama_cpp.llama_vocab_is_eog
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, logits_all=True,
                                   verbose=False)

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def tokenize(self, text: str) -> list[int]:
        """The ids llama.cpp gives a rendered chat prompt: special tokens parsed, BOS added when the file says so."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def is_eog(self, token: int) -> bool:
        """Whether llama.cpp ends generation on `token` (EOS, EOT and the end-of-turn tokens it knows by name)."""
        return bool(self._eog(self.llm._model.vocab, token))

    def logits(self, ids: list[int]) -> Any:
        """Next-token logits at every position of `ids` (teacher-forced), float32 [len(ids), n_vocab]."""
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[: len(ids)].copy()

    def greedy(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], int | None]:
        """(new token ids, the end-of-generation token it stopped on or None): greedy decoding."""
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        while len(out) < max_new_tokens:
            t = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            if self.is_eog(t):
                return out, t
            out.append(t)
            self.llm.eval([t])
        return out, None


def chat_text(tok: Any, prompt: list[dict]) -> str:
    """The prompt as a chat app sends it to llama.cpp: the chat template rendered with the generation prompt, without
    the BOS text that llama.cpp adds itself (as the Ollama TEMPLATE of common/shipping/export.py leaves it out)."""
    from common.data import prompts

    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if tok.bos_token and prompts.adds_bos(tok) and text.startswith(tok.bos_token):
        text = text[len(tok.bos_token):]
    return text


def compare(path: Path, tok: Any, chats: list[list[dict]], ref: dict, inputs: list[dict], max_new_tokens: int,
            excuse: Callable[[list[int], list[int], float], bool] | None = None) -> dict:
    """A GGUF file in llama.cpp against the reference (merged/): prompt tokens (llama.cpp's tokenizer on the
    rendered chat vs training's ids), teacher-forced next-token agreement on `inputs`, identical greedy answers.
    `ref`: {"ids", "answers", "logits", "unit"} as the export step computes them from merged/ (unit: parity.unit);
    `excuse(prompt ids, answer ids with its stop token, the file's largest logit difference)`: whether a different
    answer left merged/'s greedy path at a near-tie (parity.departs_at_near_tie)."""
    import torch

    from common.shipping import parity

    n_ctx = max([len(x["input_ids"]) for x in inputs] + [len(i) + max_new_tokens for i in ref["ids"]] + [64])
    with Runtime(path, n_ctx=n_ctx) as rt:
        ids = [rt.tokenize(chat_text(tok, c)) for c in chats]
        answers, generated, stopped = [], [], 0
        for x in ids:
            new, stop = rt.greedy(x, max_new_tokens)
            answers.append(tok.decode(new, skip_special_tokens=True).strip())
            generated.append(new + ([] if stop is None else [stop]))
            stopped += stop is not None
        logits = [torch.from_numpy(rt.logits(x["input_ids"])) for x in inputs]
    figures = parity.agreement(ref["logits"], logits, ref["unit"])
    excused = [a != r and x == rx and excuse is not None and excuse(x, g, figures["max_abs_logit_diff"] or 0.0)
               for a, r, x, rx, g in zip(answers, ref["answers"], ids, ref["ids"], generated)]
    figures.update(parity.answer_match(ref["answers"], answers, excused))
    figures.update(prompt_tokens_match=sum(a == b for a, b in zip(ids, ref["ids"])) / max(1, len(ids)),
                   stopped=stopped, reader=version())
    return figures
