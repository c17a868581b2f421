"""GGUF files and an Ollama Modelfile from the merged model, written with the `gguf` package (pure Python).

What llama.cpp, Ollama and LM Studio need is written the way llama.cpp's own converter writes it for each supported
architecture (GGUF_ARCH: Llama and Mistral as "llama", with the family in general.name so readers can tell; Qwen2/2.5
as "qwen2", Qwen3 as "qwen3", Phi-3/3.5 as "phi3"):

- tensors under llama.cpp's names (gguf.TensorNameMap) with their biases (Qwen2's q/k/v) and q/k norms (Qwen3);
  for "llama" only, q_proj/k_proj rows permuted to llama.cpp's rotary layout (the others use NEOX rotary, as
  transformers does); Phi-3's fused qkv_proj and gate_up_proj kept fused (llama.cpp's attn_qkv and ffn_up); no
  output tensor when the embeddings are tied; rope scaling as llama.cpp reads it (Llama-3.1/3.2's rope_freqs,
  Phi-3's longrope factors and attention factor); norms in f32, matrices in f16 or q8_0 (gguf.quants);
- the tokenizer the model was tuned and evaluated with: every token with its type (special tokens as CONTROL, so
  `<|im_end|>` stays one token), the merges, the special ids, add_bos, the pre-tokenizer name read off
  tokenizer.json, and the recipe's chat template (what makes a chat app format prompts as in training);

The tokenizer's part is common/model/gguf_tokenizer.py; the Ollama Modelfile's is common/shipping/ollama.py. Seq2seq models stop with one line saying so.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

from common.core import schema
from common.core.io import UserError
from common.model.gguf_tokenizer import Unsupported

# transformers model_type -> GGUF architecture
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}
ROPE_SCALING = {"llama": ("default", "llama3"), "qwen2": ("default",), "qwen3": ("default",),
                "phi3": ("default", "longrope")}  # by GGUF architecture: what this exporter writes
QUANTS = schema.GGUF_QUANTS


def rope_scaling(config: Any) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return {**rope, "rope_type": rope.get("rope_type") or rope.get("type") or "default"}


def check_supported(config: Any) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in GGUF_ARCH:
        raise Unsupported(f"GGUF export supports the {', '.join(GGUF_ARCH)} model types; this model is '{mt}' "
                          "(seq2seq models such as T5 are not run by llama.cpp/Ollama: use merged/ with transformers)")
    kind = rope_scaling(config)["rope_type"]
    if kind not in ROPE_SCALING[GGUF_ARCH[mt]]:
        raise Unsupported(f"GGUF export does not write rope scaling '{kind}' for {mt} yet; use merged/ with "
                          "transformers")


def rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


# --------------------------------------------------------------------------- tokenizer
# --------------------------------------------------------------------------- tensors
def permute_rope(w: Any, n_head: int) -> Any:
    """HF's q/k row order -> llama.cpp's (the inverse of what transformers applies when it reads a GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(folder: Path) -> Iterator[tuple[str, Any]]:
    """(name, float32 numpy array) of every tensor in a saved model folder, one at a time."""
    import torch
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors weights; run make merge")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, st.get_tensor(name).to(torch.float32).numpy()


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_tensors(config: Any) -> Iterator[tuple[str, Any]]:
    """The rope scaling tensors llama.cpp's converter writes: Llama-3.1/3.2's per-frequency factors (rope_freqs),
    Phi-3's longrope short and long factors."""
    import numpy as np

    rope, dim = rope_scaling(config), head_dim(config)
    if rope["rope_type"] == "llama3":
        freqs = 1.0 / (rope_theta(config) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old = rope.get("original_max_position_embeddings", 8192)
        out = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < old / high:
                out.append(1.0)
            elif wavelen > old / low:
                out.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                out.append(1 / ((1 - smooth) / factor + smooth))
        yield "rope_freqs.weight", np.array(out, dtype=np.float32)
    elif rope["rope_type"] == "longrope":
        for kind in ("long", "short"):
            factors = np.array(rope[f"{kind}_factor"], dtype=np.float32)
            if factors.shape != (dim // 2,):
                raise Unsupported(f"rope_scaling.{kind}_factor has {factors.size} values; head_dim/2 = {dim // 2}")
            yield f"rope_factors_{kind}.weight", factors


def longrope_attn_factor(config: Any) -> float:
    """llama.cpp's converter's attention factor of Phi-3's longrope (transformers computes the same)."""
    orig = original_context(config)
    scale = config.max_position_embeddings / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


def original_context(config: Any) -> int:
    rope = rope_scaling(config)
    return int(getattr(config, "original_max_position_embeddings", None)
               or rope.get("original_max_position_embeddings") or config.max_position_embeddings)


def gguf_tensors(folder: Path, config: Any) -> Iterator[tuple[str, Any]]:
    """(llama.cpp name, float32 array) for every weight of the merged model, in llama.cpp's layout for its
    architecture, then the rope scaling tensors."""
    import gguf

    arch = GGUF_ARCH[config.model_type]
    names = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    for name, w in read_tensors(folder):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise Unsupported(f"tensor {name} of {folder} has no llama.cpp name for the {arch} architecture")
        if arch == "llama" and ".q_proj." in name:
            w = permute_rope(w, n_head)
        elif arch == "llama" and ".k_proj." in name:
            w = permute_rope(w, n_kv)
        yield new, w
    yield from rope_tensors(config)


def write_gguf(path: Path, folder: Path, config: Any, tok_meta: dict, quant: str, describe: dict) -> dict:
    """One GGUF file (f16 or q8_0) of the merged model in `folder`; returns what was written."""
    import gguf
    import numpy as np

    if quant not in QUANTS:
        raise UserError(f"export.quantizations: '{quant}' is not one of {', '.join(QUANTS)}")
    w = gguf.GGUFWriter(str(path), GGUF_ARCH[config.model_type])
    w.add_name(describe["name"])
    w.add_description(describe["description"])
    if describe.get("license"):
        w.add_license(describe["license"])
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    w.add_rope_dimension_count(head_dim(config))
    w.add_rope_freq_base(rope_theta(config))
    if config.model_type in ("qwen3",) or getattr(config, "head_dim", None):
        w.add_key_length(head_dim(config))
        w.add_value_length(head_dim(config))
    if rope_scaling(config)["rope_type"] == "longrope":
        w.add_rope_scaling_orig_ctx_len(original_context(config))
        w.add_rope_scaling_attn_factors(longrope_attn_factor(config))
    if config.model_type == "phi3":  # 0: no sliding window (llama.cpp tells Phi-4 from Phi-3 by it)
        w.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model(tok_meta["model"])
    w.add_tokenizer_pre(tok_meta["pre"])
    w.add_token_list(tok_meta["tokens"])
    w.add_token_types(tok_meta["token_types"])
    if tok_meta.get("scores") is not None:
        w.add_token_scores(tok_meta["scores"])
    if tok_meta.get("merges"):
        w.add_token_merges(tok_meta["merges"])
    for key, tid in tok_meta["ids"].items():
        if tid is not None:
            getattr(w, {"pad": "add_pad_token_id", "unk": "add_unk_token_id"}.get(key, f"add_{key}_token_id"))(tid)
    w.add_add_bos_token(tok_meta["add_bos"])
    if "add_space_prefix" in tok_meta:
        w.add_add_space_prefix(tok_meta["add_space_prefix"])
    w.add_add_eos_token(tok_meta["add_eos"])
    if tok_meta.get("chat_template"):
        w.add_chat_template(tok_meta["chat_template"])
    counts = {"f32": 0, "f16": 0, "q8_0": 0}
    for name, arr in gguf_tensors(folder, config):
        if arr.ndim == 1:
            w.add_tensor(name, arr.astype(np.float32))
            counts["f32"] += 1
        elif quant == "q8_0" and arr.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            counts["q8_0"] += 1
        else:
            w.add_tensor(name, arr.astype(np.float16))
            counts["f16"] += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"file": path.name, "bytes": path.stat().st_size, "tensors_by_type": counts}
