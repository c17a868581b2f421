"""One training step under torch.profiler: where its time goes (`make bench BENCH="--profile"`).

What it answers: is a step bound by the device's arithmetic, or by the host issuing work (Python, the ATen
dispatcher, kernel launches)? Figures per profiled step:

  aten_ops        operator calls made from Python or autograd (top-level `aten::` events; the ops they call
                  inside, e.g. linear -> addmm, are not counted again): what the host has to issue
  device_kernels  GPU kernels run (CUDA only)
  device_busy     the time at least one kernel ran, merged over overlapping kernels, and its share of the
                  step's span (first to last event): well below 1 means the GPU waited for the host
  top             the operators (CPU) or kernels (GPU) with the most self time

`OneStepProfiler` is a TrainerCallback that profiles the optimizer step number `at` (1-based), forward, backward
and optimizer, and writes the Chrome/Perfetto trace (gzip) when given a path. `summarize` turns the profiler's
events into the figures above; it reads plain event records, so it is tested by value.
"""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger("ft")

TOP = 8  # operators / kernels listed by self time


@dataclass
class Event:
    """What summarize needs of one profiler event (times in microseconds)."""

    name: str
    on_device: bool  # a GPU kernel or memcpy (else a host-side event)
    start: float
    end: float
    self_us: float
    parent: str | None = None  # the enclosing host event's name


def events_of(function_events: Iterable[Any]) -> list[Event]:
    """Plain records from torch.profiler's FunctionEvents (host ops with their parents, device kernels)."""
    out = []
    for e in function_events:
        dev = "CPU" not in str(e.device_type)
        start, end = float(e.time_range.start), float(e.time_range.end)
        out.append(Event(e.name, dev, start, end, end - start if dev else float(e.self_cpu_time_total),
                         e.cpu_parent.name if getattr(e, "cpu_parent", None) is not None else None))
    return out


def busy_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: the time at least one of them ran."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


def summarize(events: list[Event]) -> dict:
    """The figures of the module docstring from one step's events."""
    if not events:
        raise ValueError("the profiler recorded no events")
    host = [e for e in events if not e.on_device]
    device = [e for e in events if e.on_device]
    span = max(e.end for e in events) - min(e.start for e in events)
    top_level = [e for e in host if e.name.startswith("aten::") and not (e.parent or "").startswith("aten::")]
    by_name: dict[str, list[float]] = {}
    for e in (device or [e for e in host if e.name.startswith("aten::")]):
        c = by_name.setdefault(e.name, [0, 0.0])
        c[0] += 1
        c[1] += e.self_us
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:TOP]
    out = {"span_ms": round(span / 1e3, 2), "aten_ops": len(top_level),
           "top_by": "kernel self time" if device else "operator self CPU time",
           "top": [{"name": n[:120], "count": int(c), "self_ms": round(t / 1e3, 3)} for n, (c, t) in top]}
    if device:
        busy = busy_us((e.start, e.end) for e in device)
        out.update(device_kernels=len(device), device_busy_ms=round(busy / 1e3, 2),
                   device_busy_share=round(busy / span, 4) if span else 0.0)
    return out


def one_step_profiler(at: int, trace: Path | None = None) -> Any:
    """A TrainerCallback profiling optimizer step `at` (1-based); its `.result` is summarize's dict (+ trace path)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class OneStepProfiler(TrainerCallback):
        def __init__(self) -> None:
            self.result: dict | None = None
            self._prof: Any = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step + 1 == at and self._prof is None:
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self._prof = profile(activities=acts)
                self._prof.__enter__()
                log.info("  profiling step %d", at)

        def on_step_end(self, args, state, control, **kw):
            if self._prof is None or self.result is not None:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's kernels end inside the profiled window
            self._prof.__exit__(None, None, None)
            self.result = summarize(events_of(self._prof.events()))
            if trace is not None:
                self.result["trace"] = str(write_trace(self._prof, trace))

    return OneStepProfiler()


def write_trace(prof: Any, dest: Path) -> Path:
    """The Chrome/Perfetto trace of `prof`, gzip-compressed, written whole or not at all (ui.perfetto.dev opens it)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, raw = tempfile.mkstemp(suffix=".json", dir=dest.parent)
    os.close(fd)
    part = dest.with_name(dest.name + ".part")
    try:
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(part, "wb", compresslevel=6) as out:
            shutil.copyfileobj(src, out)
        os.replace(part, dest)
    finally:
        Path(raw).unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    return dest
