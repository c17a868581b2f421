"""A real llama.cpp: installing it (built once where no wheel installs) and running a GGUF file in it: its tokenizer,
its next-token logits and its greedy answers.

The runtime is llama-cpp-python (PINNED), whose wheel bundles the llama.cpp library it was built from: PyPI has
only its source, so `make llamacpp` (which `make export` and `make test` run first: scripts/00_install.py
--llamacpp: `install()` below) installs a wheel from the model cache's wheels/ folder or builds one there once
(measured in docs/performance.md). (The prebuilt wheels on PyPI that carry llama.cpp, e.g. llama-cpp-py-sync, need
glibc 2.38; Debian 12 has 2.36.) Unlike transformers' GGUF reader, which applies the inverse of transformers' own mapping,
it reads the file the way llama.cpp, Ollama and LM Studio do: tensor names and layouts per architecture, rope type
and scaling, token attributes by model name, end-of-generation tokens. Loaded only when asked for; `missing()` says
why it cannot be had on this machine.
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

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


LLAMACPP_CMAKE = "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
BUILD_STEP = re.compile(r"\[(\d+)/(\d+)\]")  # ninja's and cmake's "[12/180] Building CXX object ..."


def install() -> None:
    """llama-cpp-python at its pin, for `make llamacpp` (scripts/00_install.py --llamacpp): kept when it loads; else
    installed from a wheel (the model cache's wheels/ folder for this CPU, or any index pip is given); else built from
    source once, its progress shown, and the wheel kept there (FT_CACHE on a Drive folder keeps it across Colab
    sessions that get the same kind of CPU). SystemExit('error: ...') when it cannot be had."""
    from common.core import paths

    spec = f"{PACKAGE}=={PINNED}"
    if installed_version(PACKAGE) == PINNED and missing() is None:
        print(f"llama.cpp runtime: {version()}", flush=True)
        return
    wheels = paths.wheel_cache() / cpu_key()  # built for this CPU (-march=native): another kind builds its own
    wheels.mkdir(parents=True, exist_ok=True)
    from_wheel = ["--find-links", str(wheels), "--only-binary", PACKAGE, spec]
    first = subprocess.run(_pip("-q", *from_wheel), capture_output=True, text=True)
    if first.returncode != 0 and any(wheels.glob(f"{PACKAGE.replace('-', '_')}-{PINNED}-*.whl")):
        why = (first.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"error: the wheel of {spec} in {wheels} did not install ({why})")
    if first.returncode != 0:
        print(f"no wheel of {spec} installs here: building it from source (once: C++, about 3 minutes on 2 idle "
              f"cores, seconds when pip's cache holds the build); the wheel is kept in {wheels}", flush=True)
        build_wheel(spec, wheels)
        subprocess.run(_pip("-q", *from_wheel), check=True)
    loads = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True, text=True)
    if loads.returncode != 0:
        why = (loads.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"error: {spec} installed but does not load here ({why})")
    print(f"llama.cpp runtime: {spec} installed", flush=True)


def cpu_key() -> str:
    """The machine and its CPU's instruction-set flags, hashed: a wheel built with -march=native runs only there (a
    Drive-kept FT_CACHE meets other CPUs on Colab)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()}-{hashlib.sha1(flags.encode()).hexdigest()[:10]}"


def build_wheel(spec: str, wheels: Path) -> None:
    """`pip wheel` from source into `wheels`, its compile steps shown every 10% (pip's own wheel cache is used when
    it holds one); on failure the build's last lines and exit 2."""
    env = {**os.environ, "CMAKE_ARGS": f"{LLAMACPP_CMAKE} {os.environ.get('CMAKE_ARGS', '')}".strip(),
           "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))}
    cmd = _pip("-v", "--no-deps", spec, "-w", str(wheels), verb="wheel")
    start, tail = time.monotonic(), []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for shown in progress(p.stdout, tail):
            print(f"  llama.cpp build: {shown} ({time.monotonic() - start:.0f} s)", flush=True)
    if p.returncode != 0 and any("Could not find a version" in line for line in tail):
        raise SystemExit(f"error: {spec}: no wheel in {wheels} and no package index to fetch its source from "
                         "(offline?); run make llamacpp where PyPI is reachable, or copy the wheel there")
    if p.returncode != 0:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"error: building {spec} failed (exit {p.returncode}; its last lines above): it needs a C++ "
                         "compiler (Debian/Ubuntu: apt install g++)")
    print(f"  llama.cpp wheel ready in {time.monotonic() - start:.0f} s", flush=True)


def progress(lines: Iterable[str], tail: list[str] | None = None) -> Iterator[str]:
    """'NN% (k/n steps)' for the compile steps in a build's output, each time a new tenth is reached; every line is
    also kept in `tail` (its last 30), for the error."""
    shown = -1
    for line in lines:
        if tail is not None:
            tail[:] = (tail + [line.rstrip()])[-30:]
        m = BUILD_STEP.search(line)
        if m and int(m[2]) > 0 and (pct := 100 * int(m[1]) // int(m[2])) // 10 > shown:
            shown = pct // 10
            yield f"{pct:3d}% ({m[1]}/{m[2]} steps)"


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _pip(*args: str, verb: str = "install") -> list[str]:
    return [sys.executable, "-m", "pip", verb, "--disable-pip-version-check", *args]


class Runtime:
    """One GGUF file loaded by llama.cpp on the CPU, one sequence at a time, every position's logits kept (or, with
    every_position=False, for a long context: only the last evaluated token's, tail_logits)."""

    def __init__(self, path: Path, n_ctx: int = 512, threads: int | None = None, every_position: bool = True):
        import llama_cpp

        self._eog = llama_cpp.llama_vocab_is_eog
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx if every_position else min(n_ctx, 64),
                                   n_threads=threads, logits_all=every_position, verbose=False)

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

    def tail_logits(self, ids: list[int], start: int) -> Any:
        """Next-token logits at positions start.. of `ids` only, float32 [len(ids) - start, n_vocab]: the first
        start + 1 tokens at once, then one at a time (made with every_position=False: no [n_ctx, n_vocab] buffer)."""
        import numpy as np

        self.llm.reset()
        rows = []
        for chunk in [ids[: start + 1]] + [[t] for t in ids[start + 1:]]:
            self.llm.eval(chunk)
            rows.append(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).copy())
        return np.stack(rows)

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
            excuse: Callable[[list[int], list[int]], bool] | None = None, token_tie: float = 0.0) -> dict:
    """A GGUF file in llama.cpp against the reference (merged/): prompt tokens (llama.cpp's tokenizer on the
    rendered chat vs training's ids), teacher-forced next-token agreement on `inputs` and, where rope scaling acts
    only at long positions, on ref["long"] (figures["long_context"]), identical greedy answers.
    `ref`: {"ids", "answers", "logits", "unit", "long"} as the export step computes them from merged/ (unit:
    parity.unit; long: parity.long_reference); `excuse(prompt ids, answer ids with its stop token)`: whether a
    different answer left merged/'s greedy path at a near-tie (parity.departs_at_near_tie); `token_tie`: the file's
    quant rounding (parity.TOKEN_TIE), the near-tie unit of next-token agreement where it is coarser than ref's."""
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
    unit = max(ref["unit"], token_tie)
    figures = parity.agreement(ref["logits"], logits, unit)
    excused = [a != r and x == rx and excuse is not None and excuse(x, g)
               for a, r, x, rx, g in zip(answers, ref["answers"], ids, ref["ids"], generated)]
    figures.update(parity.answer_match(ref["answers"], answers, excused))
    figures.update(prompt_tokens_match=sum(a == b for a, b in zip(ids, ref["ids"])) / max(1, len(ids)),
                   stopped=stopped, reader=version())
    if ref.get("long"):
        figures["long_context"] = long_context(path, ref["long"], unit)
    return figures


def long_context(path: Path, long: dict, unit: float) -> dict:
    """Next-token agreement of the file with parity.long_reference()'s logits at its long positions, the sequence in
    one context of its own length (llama.cpp picks Phi-3's long rope factors by the context's size)."""
    import torch

    from common.shipping import parity

    ids, start = long["ids"], long["from"]
    with Runtime(path, n_ctx=len(ids), every_position=False) as rt:
        got = torch.from_numpy(rt.tail_logits(ids, start))
    f = parity.agreement([long["logits"]], [got], unit)
    return {"from": start, "length": len(ids), **{k: f[k] for k in ("positions", "token_agreement", "near_tie_flips",
                                                                     "max_abs_logit_diff")}}
