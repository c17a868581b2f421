"""GGUF files and an Ollama Modelfile from the merged model, written with the `gguf` package (pure Python).

What llama.cpp, Ollama and LM Studio need is written the way llama.cpp's own converter writes it for each supported
architecture (GGUF_ARCH: Llama and Mistral as "llama", with the family in general.name so readers can tell; Qwen2/2.5
as "qwen2", Qwen3 as "qwen3", Phi-3/3.5 as "phi3"):

- tensors under llama.cpp's names (gguf.TensorNameMap) with their biases (Qwen2's q/k/v) and q/k norms (Qwen3);
  for "llama" only, q_proj/k_proj rows permuted to llama.cpp's rotary layout (the others use NEOX rotary, as
  transformers does); Phi-3's fused qkv_proj and gate_up_proj kept fused (llama.cpp's attn_qkv and ffn_up); no
  output tensor when the embeddings are tied; rope scaling as llama.cpp reads it (Llama-3.1/3.2's rope_freqs,
  Phi-3's longrope factors and attention factor); norms in f32, matrices in f16 or q8_0 (gguf.quants);
- tensor by tensor, each read from merged/ and converted a block of rows at a time (CHUNK_BYTES): the export
  needs memory for one block (a few hundred MB at most), not for the file;
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
    """The rope base transformers runs the model with: rope_parameters' rope_theta (transformers 5 puts the model
    type's own default there when config.json names none). Never guessed: a wrong base still loads in llama.cpp."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None)
    if not theta:
        raise Unsupported(f"the {getattr(config, 'model_type', None)} config has no rope_theta (neither in "
                          "rope_parameters nor at the top level): GGUF export does not guess llama.cpp's "
                          "rope.freq_base; set rope_theta in merged/config.json to the base model's")
    return float(theta)


# --------------------------------------------------------------------------- tokenizer
# --------------------------------------------------------------------------- tensors
def permute_rope(w: Any, n_head: int) -> Any:
    """HF's q/k row order -> llama.cpp's (the inverse of what transformers applies when it reads a GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # what merged/ holds; little-endian


class Weight:
    """One tensor of a .safetensors file, located by the file's header and read with plain reads (no mapping of the
    file) a block of rows at a time, as float32; q/k rows permuted to llama.cpp's layout when `heads` is set."""

    def __init__(self, file: Path, name: str, info: dict, data_start: int):
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise Unsupported(f"tensor {name} of {file} is {info['dtype']}; GGUF export reads "
                              f"{', '.join(SAFETENSORS_DTYPES)} weights (merged/ as make merge writes it)")
        self.file, self.name, self.dtype, self.heads = file, name, info["dtype"], None
        self.shape, self.offset = tuple(info["shape"]), data_start + info["data_offsets"][0]
        self.ndim = len(self.shape)

    def read(self, start: int, stop: int) -> Any:
        """Rows start:stop as float32 (f16 and bf16 widen exactly, as torch's .float() does)."""
        import numpy as np

        dtype, per_row = np.dtype(SAFETENSORS_DTYPES[self.dtype]), math.prod(self.shape[1:])
        raw = np.empty((stop - start) * per_row, dtype)
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * per_row * dtype.itemsize)
            if f.readinto(raw) != raw.nbytes:
                raise UserError(f"{self.file} ends inside tensor {self.name}: a partial copy? run make merge again")
        if self.dtype == "BF16":
            wide = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            wide = raw.astype(np.float32, copy=False)
        return wide.reshape((stop - start, *self.shape[1:]))

    def blocks(self, max_bytes: int) -> Iterator[Any]:
        """float32 blocks of whole rows (whole heads when permuted), about max_bytes each, in order."""
        rows = self.shape[0]
        unit = rows // self.heads if self.heads else 1  # permuted rows move within a head only
        step = rows if self.ndim < 2 else max(unit, max_bytes // (4 * math.prod(self.shape[1:])) // unit * unit)
        for start in range(0, rows, step):
            part = self.read(start, min(start + step, rows))
            yield permute_rope(part, part.shape[0] // unit) if self.heads else part


def read_tensors(folder: Path) -> Iterator[tuple[str, Weight]]:
    """(name, Weight) of every tensor in a saved model folder, by file then name (as safetensors lists them);
    nothing read until asked."""
    import json

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors weights; run make merge")
    for f in files:
        with open(f, "rb") as fh:  # the format: 8-byte header length, JSON header, then the data
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for name in sorted(k for k in header if k != "__metadata__"):
            yield name, Weight(f, name, header[name], 8 + size)


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
    """(llama.cpp name, Weight or float32 array) for every weight of the merged model, in llama.cpp's layout for its
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
            w.heads = n_head
        elif arch == "llama" and ".k_proj." in name:
            w.heads = n_kv
        yield new, w
    yield from rope_tensors(config)


CHUNK_BYTES = 64 << 20  # float32 bytes of a weight converted at a time: the writer's working memory


def stored_as(shape: tuple, quant: str) -> str:
    """Norms and biases in f32, matrices in f16 or q8_0 (f16 where a row is not whole q8_0 blocks)."""
    if len(shape) == 1:
        return "f32"
    return "q8_0" if quant == "q8_0" and shape[-1] % 32 == 0 else "f16"


def nbytes(shape: tuple, kind: str) -> int:
    import gguf

    return math.prod(gguf.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType[kind.upper()]))


class Encoded:
    """A tensor as GGUFWriter.write_tensor_data takes it (nbytes, tofile), its bytes made a block at a time from a
    Weight (or an array), so that only one block is ever in memory."""

    def __init__(self, arr: Any, kind: str):
        self.arr, self.kind, self.nbytes = arr, kind, nbytes(arr.shape, kind)

    def tofile(self, fout: Any) -> None:
        import gguf
        import numpy as np

        blocks = self.arr.blocks(CHUNK_BYTES) if isinstance(self.arr, Weight) else [self.arr]
        done = 0
        for block in blocks:
            if self.kind == "q8_0":
                data = gguf.quants.quantize(block.astype(np.float32, copy=False), gguf.GGMLQuantizationType.Q8_0)
            else:
                data = block.astype(np.float32 if self.kind == "f32" else np.float16)
            data.tofile(fout)
            done += data.nbytes
        if done != self.nbytes:
            raise ValueError(f"wrote {done} bytes of a tensor of {self.nbytes}")


def write_gguf(path: Path, folder: Path, config: Any, tok_meta: dict, quant: str, describe: dict) -> dict:
    """One GGUF file (f16 or q8_0) of the merged model in `folder`, written a block at a time; returns what was
    written."""
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
    # the tensor infos first (shapes only), then each tensor's data converted a block at a time: none is held
    plan = [(name, arr.shape, stored_as(arr.shape, quant)) for name, arr in gguf_tensors(folder, config)]
    for name, shape, kind in plan:  # np.float32: a placeholder (uint8 would mean a shape in bytes to gguf)
        w.add_tensor_info(name, shape, np.float32, nbytes(shape, kind), gguf.GGMLQuantizationType[kind.upper()])
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        tensors = gguf_tensors(folder, config)
        for planned, shape, kind in plan:
            name, arr = next(tensors, (None, None))
            if (name, getattr(arr, "shape", None)) != (planned, shape):
                raise ValueError(f"{folder} changed while {path.name} was written: {planned} became {name}")
            w.write_tensor_data(Encoded(arr, kind))
    finally:
        w.close()
    counts = {kind: sum(k == kind for *_, k in plan) for kind in ("f32", "f16", "q8_0")}
    return {"file": path.name, "bytes": path.stat().st_size, "tensors_by_type": counts}
