"""The Ollama Modelfile beside a GGUF file: a TEMPLATE derived from the recipe's chat template, and the stop strings."""
from __future__ import annotations

import re
from typing import Any

from common.data import prompts
from common.model.gguf_tokenizer import Unsupported

_SYS, _USR = "\x00SYSTEM\x00", "\x00PROMPT\x00"


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def ollama_template(tok: Any) -> str:
    """The tokenizer's chat template (one user turn, optional system message, generation prompt) in Ollama's
    Go-template syntax: rendered with placeholders, with and without a system message, and the difference
    becomes `{{ if .System }}...{{ else }}...{{ end }}`. A BOS the tokenizer adds itself is left out (llama.cpp
    adds it too)."""
    def render(msgs: list[dict]) -> str:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        bos = tok.bos_token
        if bos and prompts.adds_bos(tok) and text.startswith(bos):
            text = text[len(bos):]
        return text

    user = {"role": "user", "content": _USR}
    without = render([user])
    try:
        with_sys = render([{"role": "system", "content": _SYS}, user])
    except Exception:  # noqa: BLE001 (templates that reject a system role raise their own exception types)
        with_sys = without
    if _SYS not in with_sys:
        body = without
    else:
        p = _common_prefix(with_sys, without)
        while p and with_sys[p - 1] != "\n":  # the system block starts a line (a turn), not mid-token
            p -= 1
        s = _common_prefix(with_sys[p:][::-1], without[p:][::-1])
        mid_sys, mid_none = with_sys[p:len(with_sys) - s], without[p:len(without) - s]
        body = (with_sys[:p] + "{{ if .System }}" + mid_sys + ("{{ else }}" + mid_none if mid_none else "")
                + "{{ end }}" + with_sys[len(with_sys) - s:])
    for raw, go in ((_SYS, "{{ .System }}"), (_USR, "{{ .Prompt }}")):
        body = body.replace(raw, go)
    if "{{ .Prompt }}" not in body:
        raise Unsupported("the chat template does not place the user message; cannot write an Ollama TEMPLATE")
    return body


def render_ollama(template: str, system: str | None, prompt: str) -> str:
    """Ollama's rendering of the subset ollama_template writes (if/else/end on .System, .System, .Prompt)."""
    def branch(m: re.Match) -> str:
        return m.group(1) if system else (m.group(2) or "")

    out = re.sub(r"\{\{ if \.System \}\}(.*?)(?:\{\{ else \}\}(.*?))?\{\{ end \}\}", branch, template, flags=re.S)
    return out.replace("{{ .System }}", system or "").replace("{{ .Prompt }}", prompt)


def stop_strings(tok: Any, template: str) -> list[str]:
    """What ends an answer: EOS and the end-of-turn special tokens the template writes."""
    stops = [tok.eos_token] if tok.eos_token else []
    for t in tok.added_tokens_decoder.values():
        if t.special and t.content in template and t.content not in stops and t.content != tok.bos_token:
            if re.search(r"end|eot|/s>|\|im_end", t.content):
                stops.append(t.content)
    return stops


def modelfile(gguf_name: str, tok: Any, system: str | None, max_length: int) -> tuple[str, str, list[str]]:
    """(Modelfile text, TEMPLATE, stops) for `ollama create NAME -f Modelfile` next to the GGUF file."""
    template = ollama_template(tok)
    stops = stop_strings(tok, template)
    lines = [f"# ollama create <name> -f Modelfile   (in this folder; runs {gguf_name})",
             f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["# greedy, as the model was evaluated; raise for more varied answers", "PARAMETER temperature 0",
              f"PARAMETER num_ctx {max(2048, max_length)}"]
    return "\n".join(lines) + "\n", template, stops
