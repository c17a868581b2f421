"""Export the merged model for llama.cpp, Ollama and LM Studio: GGUF files and an Ollama Modelfile, checked.

    make export RECIPE=smollm2         # or: python scripts/06_export.py --recipe smollm2
    cd outputs/smollm2/export && ollama create smollm2-tuned -f Modelfile && ollama run smollm2-tuned

Writes outputs/<run>/export/ (atomically): <name>-f16.gguf and <name>-q8_0.gguf (export.quantizations) with the
tokenizer, special tokens and the recipe's chat template in the metadata (common/shipping/export.py); Modelfile (FROM the
smallest file, TEMPLATE in Ollama's syntax for the chat template, SYSTEM, stop strings); and, last,
export_report.json. The model cards (merged/README.md, adapter/README.md) gain an Ollama section.

Parity gate (common/shipping/parity.py): each GGUF is loaded by a real llama.cpp (common/shipping/llamacpp.py;
`make export` installs it first, building it once where no wheel installs: `make llamacpp`), its prompts rendered
with the file's own chat template, and compared with merged/ on export.check_prompts val examples: the prompt tokens
must be identical, next-token agreement and identical greedy answers at least export.<quant>_min_token_agreement /
_min_answer_match (near-ties excused, parity.py: an answer also counts when it leaves merged/'s greedy path where
merged/'s own two candidates were within the quant type's rounding, parity.ANSWER_TIE; f16 holds merged/'s fp16
weights exactly, so its answers must be equal but for those), and, where rope scaling acts only at long positions
(Phi-3's longrope, Llama-3's rope_freqs), next-token agreement past that point too. Below that the step fails and no
export folder is written. Seq2seq models and tokenizers GGUF cannot describe stop with one line.
"""
from __future__ import annotations

import copy
import functools
import logging
import sys
from typing import Any, Callable

from common.core import io, metadata, run
from common.model import arch, gguf_tokenizer, modeling
from common.shipping import cards, export, llamacpp, ollama, parity

log = logging.getLogger("ft")


def check(cfg: Any, quant: str, folder: Any, fname: str, ref: dict, rows: list[dict], inputs: list[dict],
          tok: Any, reference: Callable[[], Any] | None = None) -> dict:
    """Load one GGUF file as a user's tool would, in a real llama.cpp (weights, tokenizer, the file's own chat
    template), and compare it with merged/. `reference()`: merged/ loaded again, only when a llama.cpp answer
    differs (was it a near-tie?)."""
    template = gguf_tokenizer.gguf_scalars(folder / fname).get("tokenizer.chat_template")
    if not template:
        raise parity.ParityError(f"{fname} cannot format the recipe's prompts: no chat template in the file")
    file_tok = copy.copy(tok)  # the prompts rendered with the file's own chat template, as a chat app would
    file_tok.chat_template = template
    tie = parity.ANSWER_TIE[quant]  # bounded by merged/'s own logits and the quant type, never by the file's error
    excuse = None if reference is None else (
        lambda prompt, answer: parity.departs_at_near_tie(reference(), prompt, answer, tie))
    figures = llamacpp.compare(folder / fname, file_tok, [r["prompt"] for r in rows], ref, inputs,
                               cfg.eval.max_new_tokens, excuse, parity.TOKEN_TIE[quant])
    if figures["prompt_tokens_match"] < 1:
        raise parity.ParityError(f"{fname} tokenizes the recipe's prompts differently from merged/ "
                                 f"({figures['prompt_tokens_match']:.0%} identical in {figures['reader']}): "
                                 "tokenizer or chat template lost")
    e = cfg.export
    parity.gate(fname, figures, e[f"{quant}_min_token_agreement"], e[f"{quant}_min_answer_match"],
                f"Lower export.{quant}_min_answer_match only if the differences are rounding")
    return figures


def references(cfg: Any, model: Any, tok: Any, rows: list[dict], inputs: list[dict], config: Any) -> dict:
    """What every file is compared with, from merged/: prompt ids and greedy answers, teacher-forced logits, the
    near-tie unit, and the long-context sequence with its logits where rope scaling acts only there."""
    ids, answers = parity.greedy(cfg, model, tok, rows, "merged model")
    return {"ids": ids, "answers": answers, "logits": parity.teacher_forced(model, inputs), "unit": parity.unit(model),
            "long": parity.long_reference(model, config, inputs)}


def body(ctx: run.Context) -> None:
    from transformers import AutoConfig, AutoTokenizer

    cfg, rp = ctx.cfg, ctx.paths
    if not rp.merge_report.exists():
        raise io.UserError(f"no merged model in {rp.merged}; run make merge RECIPE={cfg.name} first")
    config = AutoConfig.from_pretrained(rp.merged)
    export.check_supported(config)
    why_not = llamacpp.missing()  # make export installs it first; this script run alone may find none
    if why_not is not None:
        raise io.UserError(f"{why_not}: the export gate checks every file in a real llama.cpp")
    tok = AutoTokenizer.from_pretrained(rp.merged)
    meta = gguf_tokenizer.tokenizer_metadata(tok, rp.merged, config.vocab_size, cfg.export.pre_tokenizer)
    a = arch.get(cfg)
    rows = (io.read_jsonl(rp.split("val")) or io.read_jsonl(rp.split("test")))[: cfg.export.check_prompts]
    inputs = [x for x in (a.forward_inputs(cfg, tok, ex) for ex in rows) if x]

    @functools.cache
    def reference() -> Any:
        return modeling.load_merged(cfg, rp.merged)

    ref = references(cfg, reference(), tok, rows, inputs, config)
    reference.cache_clear()  # loaded again only if a llama.cpp answer differs
    name = cfg.export.name or cfg.run
    base = cards.base_model(cfg)
    describe = {"name": f"{name} ({config.model_type} family)",
                "description": f"{cfg.description or cfg.name}: fine-tuned from {base} with recipe {cfg.name}",
                "license": cfg.card.license}
    files: dict[str, Any] = {}
    with io.atomic_dir(rp.export) as tmp:
        for quant in cfg.export.quantizations:
            fname = f"{name}-{quant}.gguf"
            log.info("writing %s", fname)
            written = export.write_gguf(tmp / fname, rp.merged, config, meta, quant, describe)
            try:
                figures = check(cfg, quant, tmp, fname, ref, rows, inputs, tok, reference)
            finally:
                reference.cache_clear()  # merged/ out of memory before the next file is written
            log.info("%s: %.0f MB; in %s vs merged/: prompt tokens %.0f%% identical, next-token agreement %.4f "
                     "(near-ties %d), identical answers %.2f (near-ties %d)", fname, written["bytes"] / 1e6,
                     figures["reader"], 100 * figures["prompt_tokens_match"], figures["token_agreement"],
                     figures["near_tie_flips"], figures["answer_match"], figures["near_tie_answers"])
            if figures.get("long_context"):
                long = figures["long_context"]
                log.info("%s: next-token agreement past position %d (long-context rope scaling) %.4f over %d positions",
                         fname, long["from"], long["token_agreement"], long["positions"])
            files[quant] = {**written, **figures}
        smallest = min(files.values(), key=lambda f: f["bytes"])["file"]
        text, template, stops = ollama.modelfile(smallest, tok, cfg.prompt.system, cfg.train.max_length)
        io.atomic_write_text(tmp / "Modelfile", text)
        report = metadata.describe(cfg, "export", merged_dir=str(rp.merged), files=files, modelfile_from=smallest,
                                   ollama_template=template, stops=stops, tokenizer_model=meta["model"],
                                   pre_tokenizer=meta["pre"], check_prompts=len(rows),
                                   thresholds={k: v for k, v in cfg.export.items() if "min_" in k})
        cards.write(cfg, rp, exported=report)  # before the export folder (the target) is committed
        io.atomic_write_json(tmp / "export_report.json", report)
    log.info("exported %s -> %s", ", ".join(f["file"] for f in files.values()), rp.export)


def main(argv: list[str] | None = None) -> int:
    return run.main("export", body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
