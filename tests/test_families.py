"""The families people fine-tune now (Qwen2.5, Qwen3, Phi-3.5, Llama-3.2): their real tokenizers against llama.cpp's
reference tokenizations, their templates' masking (every answer token and its end-of-turn token trained, nothing
else) and stop token for base and instruct checkpoints, Qwen3's thinking template refused, every recipe's stand-in
with its real model's hyper-parameters at tiny size, and their GGUF files with llama.cpp's own tensor names and
layouts (biases, q/k norms, fused projections, tied embeddings, rope scaling) and special tokens as its converter
writes them."""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import answer_spans

from common.core import config
from common.core.io import UserError
from common.data import prompts, templates
from common.model import arch, gguf_tokenizer, modeling, standins
from common.shipping import export, llamacpp

IGNORE = prompts.IGNORE
NEW = ("qwen2.5", "qwen3", "phi3.5", "llama3.2")
# the real tokenizers: their tokens (Qwen3's and Phi-3.5's; the embeddings have 151,936 and 32,064 rows), BOS
# (None: Qwen has none), the end-of-turn token that becomes the stop token, pad
REAL = {"qwen2": {"vocab": 151669, "bos": None, "eos": 151645, "pad": 151643},   # <|im_end|>, <|endoftext|>
        "phi-3": {"vocab": 32011, "bos": 1, "eos": 32000, "pad": 32000}}          # <s>, <|endoftext|>
TURN_END = {"qwen2.5": ("<|im_end|>", 151645), "qwen3": ("<|im_end|>", 151645), "phi3.5": ("<|end|>", 32007),
            "llama3.2": ("<|eot_id|>", 128009)}
BOS = {"qwen2.5": None, "qwen3": None, "phi3.5": 1, "llama3.2": 128000}


def recipe_tok(recipe, llama_tokenizers):
    """The tokenizer a tiny run of `recipe` trains with: the stand-in's real tokenizer and template, prepared by the
    recipe's architecture as load_tokenizer does."""
    from transformers import AutoTokenizer

    cfg = config.load(recipe, tiny=True)
    tok = gguf_tokenizer.as_llama_cpp_applies_it(AutoTokenizer.from_pretrained(llama_tokenizers[cfg.tiny.tokenizer]))
    if cfg.tiny.template:
        tok.chat_template = templates.TEMPLATES[cfg.tiny.template]
    arch.get(cfg).prepare_tokenizer(cfg, tok, recipe)
    return tok


@pytest.mark.parametrize("name", list(REAL))
def test_qwen_and_phi3_tokenizers_tokenize_as_llama_cpp_reference(name, llama_tokenizers, llama_vocab):
    from transformers import AutoTokenizer

    tok = gguf_tokenizer.as_llama_cpp_applies_it(AutoTokenizer.from_pretrained(llama_tokenizers[name]))
    refs = standins.reference_tokenizations(name, llama_vocab)
    assert len(refs) == 46
    assert [tok(text, add_special_tokens=False).input_ids for text, _ in refs] == [ids for _, ids in refs]
    r = REAL[name]
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (r["vocab"], r["bos"], r["eos"], r["pad"])
    assert prompts.adds_bos(tok) == (r["bos"] is not None)
    if name == "qwen2":  # Qwen3's thinking tags are one token each, at the real ids
        assert tok("<think>\n\n</think>\n\n", add_special_tokens=False).input_ids == [151667, 271, 151668, 271]
    else:  # Phi-3's chat tokens strip the whitespace after them, as its tokenizer.json and llama.cpp do
        assert tok("<|user|>\nHi<|end|>\n<|assistant|>\n", add_special_tokens=False).input_ids == [
            32010, 6324, 32007, 32001]


@pytest.mark.parametrize("recipe", NEW)
def test_new_recipes_train_each_answer_and_its_end_of_turn_and_nothing_else(recipe, llama_tokenizers):
    tok = recipe_tok(recipe, llama_tokenizers)
    eot, eot_id = TURN_END[recipe]
    assert (tok.eos_token, tok.eos_token_id) == (eot, eot_id)  # the stop token generation and the GGUF use
    msgs = [{"role": "system", "content": "Be brief."}]
    turns = [("Title: A", "Description: a."), ("Title: B", "Description: b."), ("Title: C", "Description: c.")]
    for u, a in turns[:-1]:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": turns[-1][0]})
    completion = [{"role": "assistant", "content": turns[-1][1]}]
    ids, labels = prompts.encode_chat(tok, msgs, completion, all_turns=True)
    spans = answer_spans(labels)
    # three trained spans: each exactly one answer and its end-of-turn token, with their own ids
    assert [tok.decode(ids[s:e - 1], skip_special_tokens=False).strip() for s, e in spans] == [a for _, a in turns]
    assert [ids[e - 1] for _, e in spans] == [eot_id] * 3
    assert all(labels[i] == ids[i] for s, e in spans for i in range(s, e))
    assert sum(i == eot_id for i, lab in zip(ids, labels) if lab != IGNORE) == 3  # the turns' own end tokens only
    bos = BOS[recipe]
    assert ids[0] == bos and ids.count(bos) == 1 if bos is not None else tok.bos_token_id is None
    # the generation prompt is exactly the masked prefix of the last answer
    p_ids = prompts.encode_prompt(tok, msgs)
    assert ids[: len(p_ids)] == p_ids and spans[-1][0] == len(p_ids)


@pytest.mark.parametrize("recipe,base_eos", [("qwen2.5", "<|endoftext|>"), ("llama3.2", "<|end_of_text|>")])
def test_a_base_checkpoints_eos_gives_way_to_the_templates_end_of_turn(recipe, base_eos, llama_tokenizers):
    """Qwen2.5 and Llama-3.2 base checkpoints end a text on <|endoftext|> / <|end_of_text|> but their chat templates
    end a turn on <|im_end|> / <|eot_id|>: trained with the base EOS, a model never stops. The turn end becomes EOS."""
    from transformers import AutoTokenizer

    cfg = config.load(recipe, tiny=True)
    tok = gguf_tokenizer.as_llama_cpp_applies_it(AutoTokenizer.from_pretrained(llama_tokenizers[cfg.tiny.tokenizer]))
    tok.eos_token = base_eos
    tok.chat_template = templates.TEMPLATES[cfg.tiny.template or cfg.prompt.template]
    arch.get(cfg).prepare_tokenizer(cfg, tok, "base")
    assert tok.eos_token == TURN_END[recipe][0]
    ids, labels = prompts.encode_chat(tok, [{"role": "user", "content": "Title: A"}],
                                      [{"role": "assistant", "content": "Description: a."}])
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert trained[-1] == TURN_END[recipe][1] and tok.convert_tokens_to_ids(base_eos) not in trained


def test_qwen3_thinking_template_is_refused_in_one_line_naming_the_setting(llama_tokenizers):
    from transformers import AutoTokenizer

    cfg = config.load("qwen3", ["prompt.template=native"], tiny=True)
    tok = AutoTokenizer.from_pretrained(llama_tokenizers["qwen2"])
    tok.chat_template = ("{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>' }}"
                         "{%- endif %}{{ messages[0]['content'] }}")  # the shape of Qwen3's own template
    with pytest.raises(UserError, match=r"rewrites earlier turns.*set prompt.template: qwen3") as e:
        arch.get(cfg).prepare_tokenizer(cfg, tok, "Qwen/Qwen3-4B")
    assert "\n" not in str(e.value)


def test_recipes_name_their_family_tokenizer_and_template():
    got = {}
    for name in NEW:
        c = config.load(name, tiny=True)
        got[name] = (c.model.family, c.tiny.tokenizer, c.tiny.template or c.prompt.template, standins.tied(c.tiny.full_config))
    assert got == {"qwen2.5": ("qwen2", "qwen2", "qwen2_5", True), "qwen3": ("qwen3", "qwen2", "qwen3", True),
                   "phi3.5": ("phi3", "phi-3", "phi3_5", False), "llama3.2": ("llama", "llama-bpe", "llama3_2", True)}


# the recipes whose stand-ins take a real configuration (tiny.full_config); what a stand-in shrinks
WITH_REAL = ("llama3-alpaca", "llama3.2", "tinyllama", "mistral-xauusd", "qwen2.5", "qwen3", "phi3.5", "flan-t5")
SIZES = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "head_dim", "vocab_size", "layer_types", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
         "num_heads", "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
         "_name_or_path", "transformers_version", "dtype"}  # and what a saved folder says of itself


@pytest.mark.parametrize("recipe", WITH_REAL)
def test_each_stand_in_does_its_real_models_math_at_tiny_size(recipe, model_cache, monkeypatch):
    """The stand-in a tiny run trains has everything of the real configuration (common/model/model_configs/) but the
    sizes, by value: rope theta and scaling (Llama-3.2's llama3, Phi-3.5's longrope), tied embeddings, biases,
    norms, activation, sliding window; the real q width / hidden ratio (Qwen3-4B's head_dim 128 is not
    2560 / 32 = 80) and grouped or not key/value heads. Phi-3.5's longrope factors are the real ones of the
    same frequencies (theta^(-2i/d) at the tiny head_dim), its original context LONGROPE_ORIGINAL."""
    from transformers import AutoConfig

    monkeypatch.setenv("FT_CACHE", str(model_cache))
    cfg = config.load(recipe, tiny=True)
    folder = standins.for_recipe(cfg)
    assert modeling.model_source(cfg) == str(folder)  # the one the pipeline loads
    tiny = AutoConfig.from_pretrained(folder).to_dict()
    raw = standins.real_config(cfg.tiny.full_config)
    real = AutoConfig.for_model(raw.pop("model_type"), **raw).to_dict()
    rope, real_rope = tiny.get("rope_parameters") or {}, real.get("rope_parameters") or {}
    longrope = real_rope.get("rope_type") == "longrope"
    skip = SIZES | ({"rope_parameters", "max_position_embeddings", "original_max_position_embeddings"} if longrope
                    else set())
    assert {k: tiny.get(k) for k in real if k not in skip} == {k: v for k, v in real.items() if k not in skip}
    assert set(tiny.get("layer_types") or []) == set(real.get("layer_types") or [])
    if cfg.model.family == "t5":
        assert Fraction(tiny["d_kv"] * tiny["num_heads"], tiny["d_model"]) == Fraction(
            real["d_kv"] * real["num_heads"], real["d_model"])
        return
    hd, real_hd = (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"] for c in (tiny, real))
    q_width = [Fraction(d * c["num_attention_heads"], c["hidden_size"]) for d, c in ((hd, tiny), (real_hd, real))]
    assert q_width == [Fraction(128 * 32, 2560) if recipe == "qwen3" else 1] * 2
    assert [c["num_key_value_heads"] == c["num_attention_heads"] for c in (tiny, real)] == [recipe == "phi3.5"] * 2
    assert tiny["num_hidden_layers"] == 2 and tiny["hidden_size"] % 32 == 0
    if longrope:
        step = real_hd // hd
        same = [{k: v for k, v in r.items() if not k.endswith("_factor") and k != "original_max_position_embeddings"}
                for r in (rope, real_rope)]
        assert same[0] == same[1]
        for kind in ("short_factor", "long_factor"):
            assert len(rope[kind]) == hd // 2 and rope[kind] == real_rope[kind][::step]
        orig = standins.LONGROPE_ORIGINAL
        assert rope["original_max_position_embeddings"] == orig and tiny["max_position_embeddings"] == 32 * orig
        assert real_rope["original_max_position_embeddings"] * 32 == real["max_position_embeddings"]


# --------------------------------------------------------------------------- GGUF per architecture
def standin_gguf(recipe, tmp_path, quant="f16"):
    """The recipe's tiny stand-in (the one its tiny run trains) written as GGUF, its tokenizer prepared as the
    pipeline prepares it."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = config.load(recipe, tiny=True)
    folder = Path(modeling.model_source(cfg))
    tok = gguf_tokenizer.as_llama_cpp_applies_it(AutoTokenizer.from_pretrained(folder))
    arch.get(cfg).prepare_tokenizer(cfg, tok, recipe)
    conf = AutoConfig.from_pretrained(folder)
    meta = gguf_tokenizer.tokenizer_metadata(tok, folder, conf.vocab_size)
    path = tmp_path / f"{recipe}-{quant}.gguf"
    export.write_gguf(path, folder, conf, meta, quant, {"name": f"{recipe} ({conf.model_type} family)",
                                                         "description": "stand-in"})
    return path, folder, conf, tok


@pytest.mark.parametrize("recipe", NEW)
def test_each_family_is_written_with_llama_cpps_tensor_names_and_layouts(recipe, tmp_path, model_cache, monkeypatch,
                                                                         llama_tokenizers):
    import math

    import gguf
    import numpy as np

    monkeypatch.setenv("FT_CACHE", str(model_cache))
    path, folder, conf, tok = standin_gguf(recipe, tmp_path)
    r = gguf.GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    kv = gguf_tokenizer.gguf_scalars(path)
    arch_name = export.GGUF_ARCH[conf.model_type]
    assert kv["general.architecture"] == arch_name and kv["tokenizer.ggml.eos_token_id"] == TURN_END[recipe][1]
    assert ("output.weight" in tensors) is (not conf.tie_word_embeddings)  # tied: llama.cpp reuses token_embd
    assert conf.tie_word_embeddings is (recipe != "phi3.5")
    layer = {n.split(".", 2)[2] for n in tensors if n.startswith("blk.0.")}
    hd, width, heads, kv_heads = (export.head_dim(conf), conf.hidden_size, conf.num_attention_heads,
                                  conf.num_key_value_heads)
    assert kv[f"{arch_name}.rope.dimension_count"] == hd
    assert kv[f"{arch_name}.rope.freq_base"] == export.rope_theta(conf)  # the real model's (1e6, 5e5, 1e4)
    if recipe == "qwen2.5":
        assert {"attn_q.bias", "attn_k.bias", "attn_v.bias"} <= layer and "attn_q_norm.weight" not in layer
    if recipe == "qwen3":  # head_dim apart from width/heads: q is heads * head_dim wide, not the width
        assert {"attn_q_norm.weight", "attn_k_norm.weight"} <= layer and "attn_q.bias" not in layer
        assert list(tensors["blk.0.attn_q_norm.weight"].shape) == [hd] and hd != width // heads
        assert list(tensors["blk.0.attn_q.weight"].shape) == [width, heads * hd]
        assert kv["qwen3.attention.key_length"] == kv["qwen3.attention.value_length"] == hd
    if recipe == "phi3.5":  # fused, as llama.cpp's phi3 graph reads them: q, k, v rows / gate, up rows
        assert {"attn_qkv.weight", "ffn_up.weight"} <= layer and "attn_q.weight" not in layer
        assert list(tensors["blk.0.attn_qkv.weight"].shape) == [width, (heads + 2 * kv_heads) * hd]
        assert list(tensors["blk.0.ffn_up.weight"].shape) == [width, 2 * conf.intermediate_size]
        rope = conf.rope_parameters
        for kind in ("long", "short"):
            assert np.allclose(tensors[f"rope_factors_{kind}.weight"].data, rope[f"{kind}_factor"])
        orig, ctx = standins.LONGROPE_ORIGINAL, 32 * standins.LONGROPE_ORIGINAL  # Phi-3.5: 131072 / 4096 = 32
        assert kv["phi3.rope.scaling.original_context_length"] == orig and kv["phi3.context_length"] == ctx
        assert math.isclose(kv["phi3.rope.scaling.attn_factor"], math.sqrt(1 + math.log(32) / math.log(orig)),
                            rel_tol=1e-6)
    if recipe == "llama3.2":  # llama: q/k rows permuted to llama.cpp's rotary layout
        from safetensors.torch import load_file

        w = load_file(folder / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].float().numpy()
        got = tensors["blk.0.attn_q.weight"].data.astype(np.float32)
        assert np.array_equal(got, export.permute_rope(w, heads).astype(np.float16).astype(np.float32))
        freqs = sorted(set(tensors["rope_freqs.weight"].data.tolist()))  # Llama-3.2's llama3 scaling, at 16 dims:
        assert freqs[0] == 1.0 and freqs[-1] == 32.0 and len(freqs) == 3 and 1 < freqs[1] < 32  # kept/smoothed/32x


# What llama.cpp's converter writes (convert_hf_to_gguf.py, gguf-py's SpecialVocab), by rule: BOS is the tokenizer's
# BOS token, else config.json's bos_token_id; an added token of a byte-level BPE vocabulary (get_vocab_base) or of
# Llama's SentencePiece one is CONTROL when special or shaped <|...|> (does_token_look_special), else USER_DEFINED,
# but SentencePiece's unknown token is UNKNOWN; Phi-3's converter types every added token by its special flag alone
# (<unk> too); ids no token has are UNUSED. (Llama-3's: tests/test_export.py, byte for byte against llama.cpp's file.)
CONVERTED = {"qwen2.5": 151643, "qwen3": 151643, "phi3.5": 1, "tinyllama": 1, "chat": 1}


def token_table(path: Path) -> tuple[list[str], list[int]]:
    """A GGUF's tokens and their types, read from the metadata's raw bytes (gguf.GGUFReader takes seconds for a
    150k vocabulary)."""
    import struct

    import numpy as np

    meta = gguf_tokenizer.gguf_metadata(path)
    raw, tokens, pos = meta["tokenizer.ggml.tokens"][1], [], 12
    for _ in range(struct.unpack_from("<Q", raw, 4)[0]):
        n = struct.unpack_from("<Q", raw, pos)[0]
        tokens.append(raw[pos + 8:pos + 8 + n].decode("utf-8"))
        pos += 8 + n
    return tokens, np.frombuffer(meta["tokenizer.ggml.token_type"][1][12:], "<i4").tolist()


def converter_type(t: dict, unk: int | None, vocab: str) -> int:
    import gguf

    if vocab == "llama" and t["id"] == unk:
        return gguf.TokenType.UNKNOWN
    c = t["content"]
    control = t["special"] or (vocab != "phi3" and c.startswith("<|") and c.endswith("|>"))
    return gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED


@pytest.mark.skipif(llamacpp.missing() is not None, reason=llamacpp.missing() or "")
@pytest.mark.parametrize("recipe", list(CONVERTED))
def test_special_tokens_are_written_as_llama_cpps_converter_writes_them(recipe, tmp_path, model_cache, monkeypatch,
                                                                        llama_vocab):
    """Each family's stand-in as GGUF: BOS id and every added token's type as the converter writes them (above),
    by value for Qwen (BOS 151643 from config.json though the tokenizer has none; <|fim_prefix|>, <|repo_name|>,
    <|file_sep|> CONTROL; <tool_call>, <think> USER_DEFINED; ids past the tokenizer's 151,669 UNUSED), and where
    llama.cpp's own vocabulary file has the token, its type. llama.cpp reads the BOS back (without one it takes
    token 11, `,`)."""
    import gguf

    monkeypatch.setenv("FT_CACHE", str(model_cache))
    path, folder, conf, tok = standin_gguf(recipe, tmp_path)
    tokens, types = token_table(path)
    kv = gguf_tokenizer.gguf_scalars(path)
    vocab = "phi3" if conf.model_type == "phi3" else kv["tokenizer.ggml.model"]
    added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    want = {t["id"]: (t["content"], converter_type(t, tok.unk_token_id, vocab)) for t in added}
    assert {i: (tokens[i], types[i]) for i in want} == want
    assert all(types[i] == gguf.TokenType.UNUSED for i in range(len(tok), conf.vocab_size))
    assert kv.get("tokenizer.ggml.bos_token_id") == CONVERTED[recipe]
    if recipe.startswith("qwen"):
        C, U = gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED
        assert {tokens[i]: types[i] for i in (151659, 151663, 151664, 151657, 151667)} == {
            "<|fim_prefix|>": C, "<|repo_name|>": C, "<|file_sep|>": C, "<tool_call>": U, "<think>": U}
        assert (len(tok), conf.vocab_size, types[151669]) == (151669, 151936, gguf.TokenType.UNUSED)
    ref_name = {"qwen2": "qwen2", "phi3": "phi-3"}.get(conf.model_type)
    if ref_name:  # llama.cpp's own files (Qwen1.5's: its three tokens; Phi-3-mini's: all the chat tokens)
        ref = llama_vocab / standins.VOCAB_FILES[ref_name]
        ref_tokens, ref_types = token_table(ref)
        shared = [i for i in want if i < len(ref_tokens) and ref_tokens[i] == tokens[i]]
        assert len(shared) == (3 if ref_name == "qwen2" else 14)
        assert [types[i] for i in shared] == [ref_types[i] for i in shared]
        assert gguf_tokenizer.gguf_scalars(ref)["tokenizer.ggml.bos_token_id"] == CONVERTED[recipe]
    with llamacpp.Runtime(path, n_ctx=64) as rt:
        assert rt.llm.token_bos() == CONVERTED[recipe]


def test_llama3_rope_scaling_factors_are_transformers_own():
    """Llama-3.1/3.2's scaled rope reaches the GGUF as llama.cpp's rope_freqs: for each frequency, the default
    frequency over transformers' llama3-scaled one (the real Llama-3.2-3B configuration)."""
    import numpy as np
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = standins.real_config("llama-3.2-3b-instruct")
    conf = AutoConfig.for_model(raw.pop("model_type"), **raw)
    (name, factors), = export.rope_tensors(conf)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](conf, "cpu")
    dim, theta = 128, 500000.0
    default = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    assert name == "rope_freqs.weight" and factors.shape == (64,)
    assert np.allclose(factors, default / scaled.double().numpy(), rtol=1e-4)
    assert factors.min() == 1.0 and factors.max() == 32.0  # high frequencies kept, low ones stretched 32x


def test_an_unsupported_rope_scaling_is_refused_in_one_line():
    from transformers import AutoConfig

    conf = AutoConfig.for_model("qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 32768})
    with pytest.raises(export.Unsupported, match="rope scaling 'yarn' for qwen2"):
        export.check_supported(conf)
    with pytest.raises(export.Unsupported, match="'gemma2'"):
        export.check_supported(AutoConfig.for_model("gemma2"))
