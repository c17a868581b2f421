"""The Ollama Modelfile beside a GGUF file: a TEMPLATE derived from the recipe's chat template, and the stop strings.

The TEMPLATE is Ollama's messages loop (as its own llama3/qwen2.5 templates are written): the system message in a
head through `.System` (Ollama sets it to the chat's system messages joined, which also stay in `.Messages` and are
skipped there, as are tool messages), then each user and assistant turn with its role's framing, the generation
prompt after the last user turn (a last assistant message is continued: no end of turn). Each framing is read off
the tokenizer's chat template rendered with placeholders, and the result is checked against that template on
multi-turn chats (render_ollama: Ollama's rendering of what is written here).
"""
from __future__ import annotations

import logging
import re
from typing import Any

from common.data import prompts
from common.model.gguf_tokenizer import Unsupported

log = logging.getLogger("ft")

_SYS, _USR, _USR2, _ANS = "\x00SYSTEM\x00", "\x00PROMPT\x00", "\x00PROMPT2\x00", "\x00ANSWER\x00"
# chats the TEMPLATE is checked on against the tokenizer's own template (contents as a chat app sends them)
CHECKS = [[("user", "Title: Lamp")], [("system", "Be brief."), ("user", "Title: Lamp")],
          [("user", "Q1"), ("assistant", "A1"), ("user", "Q2")],
          [("system", "Be brief."), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"),
           ("user", "Q3")]]


def _common_prefix(*texts: str) -> int:
    n = 0
    while n < min(map(len, texts)) and len({t[n] for t in texts}) == 1:
        n += 1
    return n


def _render(tok: Any, msgs: list[dict], gen: bool = True) -> str:
    """The chat template's text, less a BOS the tokenizer adds itself (llama.cpp adds it too)."""
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    bos = tok.bos_token
    return text[len(bos):] if bos and prompts.adds_bos(tok) and text.startswith(bos) else text


def _whole_tokens(tok: Any, text: str, cut: int) -> int:
    """`cut` moved back to the start of a special token or a `<...>` tag it would split (`<|end|>` and
    `<|endoftext|>` share `<|`)."""
    specials = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    tag = text.rfind("<", 0, cut)
    if tag != -1 and ">" not in text[tag:cut] and ">" in text[cut:]:
        cut = tag
    moved = True
    while moved:
        moved = False
        for s in specials:
            start = text.rfind(s, 0, cut)
            while start != -1 and start + len(s) > cut:
                cut, moved = start, True
                start = text.rfind(s, 0, cut)
    return cut


def _head(with_sys: str, without: str) -> str:
    """What comes before the first user turn, with and without a system message, as one Go-template text: the
    difference becomes `{{ if .System }}...{{ else }}...{{ end }}` (the else branch keeps a default system prompt)."""
    if _SYS not in with_sys:
        return without
    p = _common_prefix(with_sys, without)
    while p and with_sys[p - 1] != "\n":  # the system block starts a line (a turn), not mid-token
        p -= 1
    s = _common_prefix(with_sys[p:][::-1], without[p:][::-1])
    mid_sys, mid_none = with_sys[p:len(with_sys) - s], without[p:len(without) - s]
    return (with_sys[:p] + "{{ if .System }}" + mid_sys + ("{{ else }}" + mid_none if mid_none else "")
            + "{{ end }}" + with_sys[len(with_sys) - s:])


def _between(text: str, a: str, b: str) -> str:
    return text.split(a, 1)[1].split(b, 1)[0]


def multi_turn_template(tok: Any) -> str:
    """The tokenizer's chat template as Ollama's messages loop. Each turn is framing + content + end: a user turn's
    end is what follows it both before an answer and at the end of a chat without a generation prompt; what is
    left before the answer is the assistant's framing, after the last user turn the generation prompt; likewise
    for an assistant turn's end and the user framing. Raises Unsupported for a template the loop cannot express."""
    chat = [{"role": "user", "content": _USR}, {"role": "assistant", "content": _ANS},
            {"role": "user", "content": _USR2}]
    full = _render(tok, chat)
    if not all(x in full for x in (_USR, _ANS, _USR2)):
        raise Unsupported("the chat template does not place the user and assistant messages")
    user_then_answer, answer_then_user = _between(full, _USR, _ANS), _between(full, _ANS, _USR2)
    tail = full.split(_USR2)[1]
    user_end = _render(tok, chat[:1], gen=False).split(_USR)[1]
    answer_end = _render(tok, chat[:2], gen=False).split(_ANS)[1]
    qu = _whole_tokens(tok, user_then_answer, _common_prefix(user_then_answer, user_end, tail))
    qa = _whole_tokens(tok, answer_then_user, _common_prefix(answer_then_user, answer_end))
    pu = answer_then_user[qa:]
    without = full.split(_USR)[0]
    try:
        with_sys = _render(tok, [{"role": "system", "content": _SYS}, *chat]).split(_USR)[0]
    except Exception:  # noqa: BLE001 (templates that reject a system role raise their own exception types)
        with_sys = without
    if not (without.endswith(pu) and with_sys.endswith(pu)):
        raise Unsupported("the chat template frames the first user turn unlike the others")
    head = _head(with_sys[:len(with_sys) - len(pu)], without[:len(without) - len(pu)])
    gen, end = tail[qu:], answer_then_user[:qa]
    user = pu + "{{ .Content }}" + user_then_answer[:qu] + (f"{{{{ if $last }}}}{gen}{{{{ end }}}}" if gen else "")
    answer = user_then_answer[qu:] + "{{ .Content }}" + (f"{{{{ if not $last }}}}{end}{{{{ end }}}}" if end else "")
    body = (head + "{{ range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
            + _then('{{- if eq .Role "user" }}' + user, '{{ else if eq .Role "assistant" }}') + answer
            + "\n{{- end }}\n{{- end }}")
    return body.replace(_SYS, "{{ .System }}")


def _then(text: str, action: str) -> str:
    """`text` then `action` on a new line, `{{-` taking the layout newline; on the same line where `text` ends in
    whitespace of its own (which `{{-` would take too)."""
    return text + (action if text[-1:].isspace() else "\n{{-" + action[2:])


def single_turn_template(tok: Any) -> str:
    """One user turn (and an optional system message) in Ollama's legacy .System/.Prompt form."""
    user = {"role": "user", "content": _USR}
    without = _render(tok, [user])
    try:
        with_sys = _render(tok, [{"role": "system", "content": _SYS}, user])
    except Exception:  # noqa: BLE001 (templates that reject a system role raise their own exception types)
        with_sys = without
    body = _head(with_sys, without).replace(_SYS, "{{ .System }}").replace(_USR, "{{ .Prompt }}")
    if "{{ .Prompt }}" not in body:
        raise Unsupported("the chat template does not place the user message; cannot write an Ollama TEMPLATE")
    return body


def ollama_template(tok: Any) -> str:
    """The TEMPLATE: the messages loop when it renders CHECKS exactly as the chat template does, else (a template
    the loop cannot express) the single-turn form, with a warning: Ollama then frames earlier turns itself."""
    try:
        tmpl = multi_turn_template(tok)
        for chat in CHECKS:
            msgs = [{"role": r, "content": c} for r, c in chat]
            try:
                want = _render(tok, msgs)
            except Exception:  # noqa: BLE001 (a template that rejects a system role; so does the loop: no .System)
                continue
            if render_ollama(tmpl, None, msgs) != want:
                raise Unsupported(f"the messages loop renders {[r for r, _ in chat]} unlike the chat template")
        return tmpl
    except Exception as e:  # noqa: BLE001 (Unsupported, or the chat template's own exception on a probe chat)
        log.warning("Ollama TEMPLATE for one turn only: %s", e)
        return single_turn_template(tok)


# --------------------------------------------------------------------------- Ollama's rendering
_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _parse(template: str) -> list:
    """The template as a tree: text, fields, if/else-if/else, range over .Messages, $last (what this module writes;
    text/template's trim markers applied)."""
    parts, pos = [], 0
    for m in _ACTION.finditer(template):
        parts += [template[pos:m.start()], m]
        pos = m.end()
    parts.append(template[pos:])
    for i in range(1, len(parts), 2):
        if parts[i].group(1):
            parts[i - 1] = parts[i - 1].rstrip(" \t\r\n")
        if parts[i].group(3):
            parts[i + 1] = parts[i + 1].lstrip(" \t\r\n")
    items = [p if isinstance(p, str) else p.group(2) for p in parts]

    def block(i: int, stop: tuple) -> tuple[list, int]:
        nodes = []
        while i < len(items):
            item = items[i]
            if i % 2 == 0:
                nodes.append(("text", item))
            elif stop and item.startswith(stop):
                return nodes, i
            elif item.startswith("if "):
                branches, i = [(item[3:], None)], i + 1
                while True:
                    body, i = block(i, ("else", "end"))
                    branches[-1] = (branches[-1][0], body)
                    if items[i] == "end":
                        break
                    branches.append((items[i][8:] if items[i].startswith("else if ") else "true", None))
                    i += 1
                nodes.append(("if", branches))
            elif item.startswith("range "):
                body, i = block(i + 1, ("end",))
                nodes.append(("range", body))
            else:
                nodes.append(("action", item))
            i += 1
        return nodes, i

    return block(0, ())[0]


def _value(expr: str, dot: dict, scope: dict) -> Any:
    if expr == "true":
        return True
    if expr.startswith("not "):
        return not _value(expr[4:], dot, scope)
    if expr.startswith("eq "):
        field, want = expr[3:].split(" ", 1)
        return _value(field, dot, scope) == want.strip('"')
    if expr == "$last":
        return scope["last"]
    if re.fullmatch(r"\.[A-Z]\w*", expr):
        return dot.get(expr[1:], "")
    raise ValueError(f"render_ollama does not render {{{{ {expr} }}}}")


def render_ollama(template: str, system: str | None, prompt: str | list[dict]) -> str:
    """What Ollama renders from `template` for a chat: the system message (as a Modelfile SYSTEM or a chat's) and
    a user prompt or messages, passed as Ollama does (consecutive messages of one role merged, .System the system
    messages joined). Renders the subset of Go's text/template that this module writes; tests/test_ollama.py checks
    it against Go itself."""
    msgs = ([{"role": "system", "content": system}] if system else []) + (
        [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt])
    merged: list[dict] = []
    for m in msgs:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1]["content"] += "\n\n" + m["content"]
        else:
            merged.append({"role": m["role"], "content": m["content"]})
    root = {"System": "\n\n".join(m["content"] for m in msgs if m["role"] == "system"),
            "Messages": [{"Role": m["role"], "Content": m["content"]} for m in merged], "Prompt": "", "Response": ""}
    scope = {"last": False}

    def run(nodes: list, dot: dict) -> str:
        out = []
        for kind, arg in nodes:
            if kind == "text":
                out.append(arg)
            elif kind == "if":
                body = next((b for cond, b in arg if _value(cond, dot, scope)), [])
                out.append(run(body, dot))
            elif kind == "range":
                out += [run(arg, m) for m in root["Messages"]]
            elif arg.startswith("$last := "):  # eq (len (slice $.Messages $i)) 1: the last message
                scope["last"] = dot is root["Messages"][-1]
            else:
                out.append(str(_value(arg, dot, scope) or ""))
        return "".join(out)

    return run(_parse(template), root)


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
