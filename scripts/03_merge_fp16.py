"""Merge the LoRA adapter into the base model and save a standalone fp16 model, checked against the adapter.

    make merge RECIPE=smollm2          # or: python scripts/03_merge_fp16.py --recipe smollm2

The base is reloaded in full precision (model.full_precision_name_or_path when the training base is 4-bit):
merging never happens inside a quantized model. On a CPU the merge is done in fp32 and the result cast to
merge.dtype (fp16 by default, which stays closer to the adapter model than bf16); on a GPU the base loads
directly in merge.dtype.

Parity gate (common/shipping/parity.py): the merged model is reloaded from what was saved, by the loader eval and the demo
use (modeling.load_merged), and compared with the adapter model on merge.check_prompts val examples: next-token agreement on the whole examples and identical greedy
answers. Below merge.min_token_agreement / merge.min_answer_match the step fails and nothing is written.

Writes outputs/<run>/merged/ (weights + tokenizer, atomically) and, last, outputs/<run>/merge_report.json.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

from common.core import io, metadata, run
from common.model import arch, modeling
from common.shipping import parity

log = logging.getLogger("ft")


def check_rows(cfg: Any, rp: Any) -> list[dict]:
    rows = io.read_jsonl(rp.split("val")) or io.read_jsonl(rp.split("test"))
    return rows[: cfg.merge.check_prompts]


def body(ctx: run.Context) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    cfg, rp = ctx.cfg, ctx.paths
    if not (rp.adapter / "adapter_config.json").exists():
        raise io.UserError(f"no adapter in {rp.adapter}; train first (make train RECIPE={cfg.name})")
    on_gpu = modeling.cuda()
    work = cfg.merge.dtype if on_gpu else "fp32"
    source = modeling.model_source(cfg, full_precision=True)
    tok = AutoTokenizer.from_pretrained(rp.adapter)
    a = arch.get(cfg)
    rows = check_rows(cfg, rp)
    inputs = [x for x in (a.forward_inputs(cfg, tok, ex) for ex in rows) if x]

    log.info("loading %s in %s (never merging into a quantized model)", source, work)
    model = PeftModel.from_pretrained(modeling.load_model(cfg, source, 0, work), rp.adapter)
    ref, ref_unit = parity.teacher_forced(model, inputs), parity.unit(model)
    precision = io.read_json(rp.adapter / "run_info.json", {}).get("plan", {}).get("precision", "fp32")  # as eval
    _, ref_answers = parity.greedy(cfg, model, tok, rows, "adapter model", precision)
    model = model.merge_and_unload()
    model.to(modeling.torch_dtype(cfg.merge.dtype))
    with io.atomic_dir(rp.merged) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
        # What leaves the repo is checked: the saved weights, reloaded by eval's own loader on this machine.
        saved = modeling.load_merged(cfg, tmp)
        got = parity.teacher_forced(saved, inputs)
        figures = parity.agreement(ref, got, max(ref_unit, parity.unit(saved)))
        figures.update(parity.answer_match(ref_answers, parity.greedy(cfg, saved, tok, rows, "merged model", precision)[1]))
        log.info("merged vs adapter on %d val examples: next-token agreement %.4f, identical answers %.2f, "
                 "max |logit diff| %.4g", len(rows), figures["token_agreement"], figures["answer_match"],
                 figures["max_abs_logit_diff"] or float("nan"))
        parity.gate("the merged model", figures, cfg.merge.min_token_agreement, cfg.merge.min_answer_match,
                    "Check model.full_precision_name_or_path is the base the adapter was trained on, or lower "
                    "merge.min_answer_match if the differences are rounding")
    report = metadata.describe(cfg, "merge", merged_dir=str(rp.merged), merge_source=source,
                               saved_dtype=cfg.merge.dtype, merged_in=work, checked_in=modeling.inference_dtype(),
                               check_prompts=len(rows),
                               thresholds={"min_token_agreement": cfg.merge.min_token_agreement,
                                           "min_answer_match": cfg.merge.min_answer_match}, **figures)
    io.atomic_write_json(rp.merge_report, report)
    log.info("merged -> %s", rp.merged)


def main(argv: list[str] | None = None) -> int:
    return run.main("merge", body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
