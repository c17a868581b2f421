"""The Ollama TEMPLATE run by Go's own text/template with Ollama's data (the chat's messages, .System) formats a
multi-turn chat exactly as the recipe's chat template does, for every recipe's tokenizer and template; the Python
renderer the export checks with agrees with Go; a template the messages loop cannot express falls back to one turn."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess

import pytest

from common.core import config
from common.data import prompts
from common.model import arch, gguf_tokenizer
from common.shipping import ollama

# Ollama's template.Execute (template/template.go): consecutive messages of one role merged with "\n\n", .System the
# system messages joined with "\n\n" (they also stay in .Messages), each message a templateMessage; missingkey=zero.
GO_RENDER = r'''package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role, Content, Thinking, ToolName, ToolCallID string
}

type Case struct {
	Template string
	Messages []Message
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		var system []string
		var msgs []*Message
		for i := range c.Messages {
			m := c.Messages[i]
			if m.Role == "system" {
				system = append(system, m.Content)
			}
			if len(msgs) > 0 && msgs[len(msgs)-1].Role == m.Role {
				msgs[len(msgs)-1].Content += "\n\n" + m.Content
			} else {
				msgs = append(msgs, &m)
			}
		}
		t := template.Must(template.New("").Option("missingkey=zero").Parse(c.Template))
		var b strings.Builder
		data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": msgs, "Response": ""}
		if err := t.Execute(&b, data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
'''
# one recipe per (tokenizer, template) pair: ChatML/SmolLM2, Alpaca and the PT-BR template on Llama-3's tokenizer,
# Llama-3.2, Mistral and Zephyr (TinyLlama) on Llama-2's SentencePiece, Phi-3.5, Qwen2.5, Qwen3 non-thinking
RECIPES = ("smollm2", "llama3-alpaca", "llama3-sharegpt", "llama3.2", "mistral-xauusd", "tinyllama", "phi3.5",
           "qwen2.5", "qwen3")
SYSTEM = {"role": "system", "content": "You write product copy.\nBe brief."}
TURNS = [{"role": "user", "content": "Title: Lamp {x}\nColor: red"},
         {"role": "assistant", "content": "Description: A red lamp."},
         {"role": "user", "content": "Title: Mug"},
         {"role": "assistant", "content": "Description: A mug.\n\nDishwasher safe."},
         {"role": "user", "content": "Title: Chef's knife, 20 cm"}]
CHATS = [[SYSTEM, *TURNS], TURNS, TURNS[:1], [SYSTEM, TURNS[0]]]


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """Go's text/template as Ollama calls it: a program built once per session (Go's standard library only; GOCACHE
    and GOPATH in a temporary folder, no network)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go); the TEMPLATE is rendered by Go itself")
    d = tmp_path_factory.mktemp("go-render")
    (d / "main.go").write_text(GO_RENDER)
    env = dict(os.environ, GOCACHE=str(d / "cache"), GOPATH=str(d / "gopath"), GOPROXY="off", GOFLAGS="",
               GO111MODULE="off", CGO_ENABLED="0")
    subprocess.run([go, "build", "-o", str(d / "render"), "main.go"], cwd=d, env=env, check=True,
                   capture_output=True, text=True)

    def render(cases: list[tuple[str, list[dict]]]) -> list[str]:
        data = [{"Template": t, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in msgs]}
                for t, msgs in cases]
        p = subprocess.run([str(d / "render")], input=json.dumps(data), capture_output=True, text=True, check=True)
        return json.loads(p.stdout)

    return render


_LOADED: dict = {}


def recipe_tok(recipe, llama_tokenizers):
    """The tokenizer a tiny run of `recipe` exports with: its stand-in's tokenizer and template, prepared by the
    recipe's architecture (stop token) as load_tokenizer does. Each vocabulary is loaded once (seconds each) and
    given back its own EOS and pad before a recipe prepares it."""
    from transformers import AutoTokenizer

    from common.data import templates
    from common.model import standins

    cfg = config.load(recipe, tiny=True)
    name = cfg.tiny.tokenizer
    if name not in _LOADED:
        folder = standins.smollm2_tokenizer_dir() if name == "smollm2" else llama_tokenizers[name]
        tok = gguf_tokenizer.as_llama_cpp_applies_it(AutoTokenizer.from_pretrained(folder))
        _LOADED[name] = tok, tok.eos_token, tok.pad_token
    tok, eos, pad = _LOADED[name]
    tok.eos_token, tok.pad_token = eos, pad
    tok.chat_template = templates.TEMPLATES[cfg.tiny.template or cfg.prompt.template]
    arch.get(cfg).prepare_tokenizer(cfg, tok, recipe)
    return tok


def test_ollama_runs_the_template_like_each_recipes_chat_template(go_render, llama_tokenizers, model_cache,
                                                                   monkeypatch):
    """A 3-turn chat (system, user, assistant, user, assistant, user), the same without a system message, one turn
    with and without one: Go renders the TEMPLATE from Ollama's data exactly as apply_chat_template renders the
    chat with the generation prompt (less the BOS llama.cpp adds itself); Mistral's template refuses a system
    message, so its chats have none. render_ollama, the export's own check, gives Go's text."""
    monkeypatch.setenv("FT_CACHE", str(model_cache))
    cases, want = [], []
    for recipe in RECIPES:
        tok = recipe_tok(recipe, llama_tokenizers)
        tmpl = ollama.ollama_template(tok)
        assert "{{ range $i, $_ := .Messages }}" in tmpl, recipe
        for chat in CHATS:
            if recipe == "mistral-xauusd" and chat[0]["role"] == "system":
                continue
            text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            if tok.bos_token and prompts.adds_bos(tok) and text.startswith(tok.bos_token):  # Llama-3.2, Mistral
                text = text[len(tok.bos_token):]
            cases.append((tmpl, chat))
            want.append((recipe, len(chat), text))
    got = go_render(cases)
    assert [(r, n, g) for (r, n, _), g in zip(want, got)] == want
    assert [ollama.render_ollama(t, None, c) for t, c in cases] == got


def test_a_modelfile_system_prompt_is_rendered_as_a_chats_own(go_render, llama_tokenizers, model_cache, monkeypatch):
    """Ollama puts the Modelfile's SYSTEM in front of a chat that has none (a system message: .System and the first
    of .Messages): Qwen2.5's default system prompt then gives way to it, as in training."""
    monkeypatch.setenv("FT_CACHE", str(model_cache))
    tok = recipe_tok("qwen2.5", llama_tokenizers)
    tmpl = ollama.ollama_template(tok)
    got = go_render([(tmpl, [SYSTEM, *TURNS]), (tmpl, TURNS)])
    assert got[0] == tok.apply_chat_template([SYSTEM, *TURNS], tokenize=False, add_generation_prompt=True)
    assert "You are Qwen" in got[1] and "You are Qwen" not in got[0]
    assert ollama.render_ollama(tmpl, SYSTEM["content"], TURNS) == got[0]


def test_a_template_the_messages_loop_cannot_express_falls_back_to_one_turn(llama_tokenizers, model_cache,
                                                                          monkeypatch, caplog):
    """Llama-2's chat template folds the system message into the first user turn: no loop of per-role turns writes
    it, so the TEMPLATE is the single-turn one (Ollama's .System/.Prompt), with a warning saying so."""
    monkeypatch.setenv("FT_CACHE", str(model_cache))
    tok = recipe_tok("tinyllama", llama_tokenizers)
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set msgs = messages[1:] %}"
        "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}{% for m in msgs %}"
        "{% if m['role'] == 'user' %}{{ '[INST] ' }}{% if loop.first and sys %}"
        "{{ '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' }}{% endif %}{{ m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
    with caplog.at_level(logging.WARNING, logger="ft"):
        tmpl = ollama.ollama_template(tok)
    assert tmpl == ("{{ if .System }}[INST] <<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ else }}[INST] {{ end }}"
                    "{{ .Prompt }} [/INST]")
    assert "Ollama TEMPLATE for one turn only: the chat template frames the first user turn" in caplog.text
