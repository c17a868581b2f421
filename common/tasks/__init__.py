"""Tasks: what a recipe teaches, one module each (nanochat's tasks/<name>.py, axolotl's prompt_strategies).

A task module in this package defines `TASK`, an instance of a `Task` subclass, and that is all a new task needs
(plus a recipe naming it in `task:`): the registry below finds the modules, config.py adds the task's own settings
to the schema, and every step asks the task instead of testing `cfg.task`. A task knows:

- how to read and clean its records from the raw file, counting each dropped row by reason (`records`);
- which record fields a prompt may use and its default prompt (`fields`, `prompt_defaults`);
- its own settings, per recipe section (`settings`: e.g. data.min_title_chars for product descriptions);
- how to score answers against references, per example and in aggregate, and which per-example score the
  paired confidence intervals (tuned vs base, vs each baseline) are computed on (`score`, `primary`);
- its simple baselines (`baselines`), each answering the eval prompts and scored like a model, so a verdict is
  always against the strongest of them too; and what the demo asks for (`demo_fields`, `extra_prompts`).

A task module's top level imports only the standard library, `common.core` and `common.data`: Make reads every
recipe's settings (and so every task module) before anything else is installed, with PyYAML and python-dotenv alone
(tests/test_bootstrap.py). Scores and baselines import the evaluation stage inside the methods that use it.

Adding a baseline to your own task: override `baselines(train, rows)` and return {name: one answer per eval row};
`train` and `rows` are processed split rows (id, prompt, completion and the fields `example_extra` keeps), so a
rule that reads a record field needs that field in `example_extra`. Extend the parent's dict to keep its baselines:

    def baselines(self, train, rows):
        return {**super().baselines(train, rows), "echo": [prompts.prompt_text(r) for r in rows]}
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path
from typing import Any, Iterator


class Task:
    name: str = ""
    expects: str = ""  # what the raw file must look like, for error messages
    fields: tuple[str, ...] = ()  # record fields a prompt template may use
    prompt_defaults: dict[str, str] = {}  # prompt.user / prompt.target when the recipe sets none
    settings: dict[str, dict] = {}  # section -> {key: config.F}; only this task accepts these keys
    primary: str = ""  # aggregate metric the report leads with (higher is better)
    per_example: str = ""  # per-example score the paired bootstrap CI is computed on
    duplicate_reason = "duplicate"  # drop reason for a repeated record (see records' dedupe key)
    demo_field = ""  # the field a person types in the demo (a product title, a headline)
    answer_fields: tuple[str, ...] = ()  # fields that hold the answer: empty in a demo question
    held_out_loss = False  # eval also compares base and tuned loss per token on the test answers (paired CI)
    trains = "sft"  # the training step (common/core/stamps.py): sft or preference (pairs of answers)
    pairs = False  # eval rows hold a chosen and a rejected answer, scored as pairs

    def source(self, setting: str) -> Any:
        """Where records come from when data.path is not a file (a dataset folder, a hub id); None: a file."""
        return None

    def records(self, path: Path, cfg: Any, rep: Any) -> Iterator[tuple[str | None, dict]]:
        """(dedupe key or None, fields) for every clean record; rejected rows go to rep.drop(reason, where)."""
        raise NotImplementedError

    # prepare's hooks (scripts/01_prepare.py); a task whose examples are not prompt/completion overrides them
    def split(self, cfg: Any, path: Any, rep: Any) -> tuple[dict[str, list[dict]], str | None]:
        """(train/val/test records, a note when the sizes were scaled) of the seeded sample."""
        from common.data import readers

        return readers.split_records(cfg, self, path, rep)

    def extra_val(self, cfg: Any, path: Any, parts: dict[str, list[dict]]) -> tuple[list[dict], str | None]:
        """data.val_extra records the sample left out, for val (common/data/splits.py)."""
        from common.data import splits

        return splits.extra_val(cfg, self, path, parts)

    def examples(self, cfg: Any, architecture: Any, records: list[dict], seed: int, extend: bool) -> list[dict]:
        """Processed split rows of records (extend: prompt.conversation_extension applies)."""
        from common.data import readers

        return readers.to_examples(cfg, self, architecture, records, seed, extend)

    def trained_tokens(self, cfg: Any, architecture: Any, tok: Any, ex: dict, last_only: bool
                       ) -> tuple[str | None, int, int]:
        """(why the row would train nothing, else None; its trained tokens; its tokens) within train.max_length."""
        return architecture.trained_tokens(cfg, tok, ex, last_only)

    def lengths(self, architecture: Any, tok: Any, ex: dict) -> list[int]:
        """Untruncated token lengths of the sequences one row puts through the model."""
        return [architecture.length(tok, ex)]

    def example_extra(self, fields: dict) -> dict:
        """Fields kept next to prompt/completion in the processed split (for reading the files)."""
        return {}

    def score(self, preds: list[str], refs: list[str]) -> tuple[dict, list[dict]]:
        """(aggregate metrics, per-example scores; each has the `per_example` key)."""
        raise NotImplementedError

    def baselines(self, train: list[dict], rows: list[dict]) -> dict[str, list[str]]:
        """{name: one answer per row of `rows`} from the train split's rows and each eval row's own fields."""
        return {}

    def demo_fields(self, text: str, extra: dict[str, str]) -> dict:
        """Record fields for a demo question typed by a person; other fields read 'unknown' unless given."""
        return _Unknown({**{f: "" for f in self.answer_fields}, self.demo_field: text, **extra})

    def extra_prompts(self, cfg: Any) -> list[tuple[str, dict]]:
        """(label, fields) of extra prompts answered before and after training (e.g. eval.fixed_prompts)."""
        return []


class _Unknown(dict):
    def __missing__(self, key: str) -> str:
        return "unknown"


@cache
def names() -> tuple[str, ...]:
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


@cache
def get(name: str) -> Task:
    if name not in names():
        raise KeyError(f"unknown task '{name}'; available: {', '.join(names())}")
    task = importlib.import_module(f"{__name__}.{name}").TASK
    assert task.name == name, f"common/tasks/{name}.py defines TASK.name={task.name!r}"
    return task
