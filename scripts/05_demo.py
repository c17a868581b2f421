"""Ask the base and the tuned model the same question and print the answers side by side.

    make demo TITLE="Acme Chef Knife, Black, Large"
    make demo RECIPE=chat PROMPT="Where is my order TO-12345?"     # a typed message (task chat)
    python scripts/05_demo.py --recipe smollm2 --title "Acme Chef Knife, Black, Large"
    python scripts/05_demo.py --recipe smollm2-xauusd --title "Fed signals sharply rate cuts as inflation cools"
    python scripts/05_demo.py --recipe smollm2            # no title: asks interactively (empty line quits)

The title is what the recipe's task asks a person for (a product title; for the forecast task, the headline; for
the chat task, a message: --prompt is the same option);
other prompt fields can be given with --field key=value (missing ones read "unknown"). The prompt is encoded and
truncated exactly as in evaluation (common/model/arch.py). --use adapter (default when no merged model exists) or --use merged picks the
tuned model. Writes nothing.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import textwrap

from common import tasks
from common.core import io, run
from common.evaluation import compare
from common.model import arch, modeling


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--title", "--prompt", dest="title",
                    help="what the task asks a person for (a product title, a headline, a chat message)")
    ap.add_argument("--field", action="append", default=[], metavar="KEY=VALUE", help="extra prompt field")
    ap.add_argument("--use", choices=("adapter", "merged"), help="tuned model to load (default: merged if present)")
    ap.add_argument("--max-new-tokens", type=int)


def body(ctx: run.Context) -> None:
    from transformers import AutoTokenizer

    cfg, rp, a = ctx.cfg, ctx.paths, ctx.args
    if not (rp.adapter / "adapter_config.json").exists():
        raise io.UserError(f"no tuned model in {rp.adapter}; run make train RECIPE={cfg.name} first")
    use = a.use or ("merged" if rp.merge_report.exists() else "adapter")
    tok = AutoTokenizer.from_pretrained(rp.adapter)
    base = modeling.load_model(cfg, compare.base_source(cfg)[0], 0, modeling.inference_dtype())  # as eval
    tuned = modeling.load_tuned(cfg, rp, use)
    max_new = a.max_new_tokens or cfg.eval.max_new_tokens
    task, arc = tasks.get(cfg.task), arch.get(cfg)
    extra = dict(kv.partition("=")[::2] for kv in a.field)
    width = max(40, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)

    def answer(title: str) -> None:
        ids = [arc.encode_prompt(cfg, tok, arc.build(cfg, task.demo_fields(title, extra)))]
        b = modeling.generate(base, tok, ids, max_new, arc, 1, "base")[0]
        t = modeling.generate(tuned, tok, ids, max_new, arc, 1, "tuned")[0]
        left, right = textwrap.wrap(b, width) or [""], textwrap.wrap(t, width) or [""]
        print(f"\n{'BASE':<{width}} | TUNED ({use})\n{'-' * width}-+-{'-' * width}")
        for i in range(max(len(left), len(right))):
            print(f"{(left[i] if i < len(left) else ''):<{width}} | {right[i] if i < len(right) else ''}")
        print()

    if a.title:
        answer(a.title)
        return
    while True:
        try:
            title = input(f"{task.demo_field.replace('_', ' ')} (empty to quit)> ").strip()
        except EOFError:
            break
        if not title:
            break
        answer(title)


def main(argv: list[str] | None = None) -> int:
    return run.main("demo", body, argv, __doc__, add_args, lock=False)


if __name__ == "__main__":
    sys.exit(main())
