"""Merge the LoRA adapter into the base model and save a standalone fp16 model.

    make merge RECIPE=smollm2          # or: python scripts/03_merge_fp16.py --recipe smollm2

The base is reloaded in full precision (model.full_precision_name_or_path when the training base is 4-bit):
merging never happens inside a quantized model. On a CPU the merge is done in fp32 and the result cast to
merge.dtype (fp16 by default, which stays closer to the adapter model than bf16); on a GPU the base loads
directly in merge.dtype. A check compares the logits of the adapter model and the merged model on a few val
prompts and records the largest absolute difference.

Writes outputs/<run>/merged/ (weights + tokenizer, atomically) and, last, outputs/<run>/merge_report.json.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

from common import arch, io, metadata, modeling, run

log = logging.getLogger("ft")


def check_inputs(cfg: Any, tok: Any, rows: list[dict]) -> list[dict]:
    """Whole examples (prompt and answer) as model inputs, for comparing the merged model with the adapter."""
    a = arch.get(cfg)
    return [x for x in (a.forward_inputs(cfg, tok, ex) for ex in rows[: cfg.merge.check_prompts]) if x]


def logits(model: Any, inputs: list[dict]) -> list[Any]:
    import torch

    dev = next(model.parameters()).device
    outs = []
    with torch.inference_mode():
        for x in inputs:
            kw = {k: torch.tensor([v], device=dev) for k, v in x.items()}
            outs.append(model(**kw).logits.float().cpu())
    return outs


def body(ctx: run.Context) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    cfg, rp = ctx.cfg, ctx.paths
    if not (rp.adapter / "adapter_config.json").exists():
        raise io.UserError(f"no adapter in {rp.adapter}; train first (make train RECIPE={cfg.name})")
    on_gpu = modeling.cuda()
    work = cfg.merge.dtype if on_gpu else "fp32"
    source = modeling.model_source(cfg, full_precision=True)
    tok = AutoTokenizer.from_pretrained(rp.adapter)
    inputs = check_inputs(cfg, tok, io.read_jsonl(rp.split("val")) or io.read_jsonl(rp.split("test")))

    log.info("loading %s in %s (never merging into a quantized model)", source, work)
    model = PeftModel.from_pretrained(modeling.load_model(cfg, source, 0, work), rp.adapter)
    ref = logits(model, inputs)
    model = model.merge_and_unload()
    model.to(modeling.torch_dtype(cfg.merge.dtype))
    with io.atomic_dir(rp.merged) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    if not on_gpu:  # the saved fp16 weights, evaluated in fp32 as the CPU eval will
        model.to(torch.float32)
    got = logits(model, inputs)
    diffs = [float((a - b).abs().max()) for a, b in zip(ref, got)]
    scale = max((float(a.abs().max()) for a in ref), default=0.0)
    report = metadata.describe(cfg, "merge", merged_dir=str(rp.merged), merge_source=source,
                               saved_dtype=cfg.merge.dtype, merged_in=work, check_prompts=len(inputs),
                               max_abs_logit_diff=max(diffs, default=None), per_prompt_max_abs_logit_diff=diffs,
                               max_abs_logit=scale)
    io.atomic_write_json(rp.merge_report, report)
    log.info("merged -> %s; max |logit diff| vs adapter model = %.4g (logits up to %.1f)", rp.merged,
             max(diffs, default=float("nan")), scale)


def main(argv: list[str] | None = None) -> int:
    return run.main("merge", body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
