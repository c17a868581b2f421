"""Will it fit: predicted peak memory and time per step of a recipe's run on a named device, before any download.

    make plan RECIPE=llama3-alpaca GPU=T4                 # or: python scripts/plan.py --recipe llama3-alpaca --gpu T4
    make plan RECIPE=smollm2                               # this CPU: peak RSS and seconds per step
    python scripts/plan.py --recipe qwen3 --gpu 24 --set train.max_length=1024

--gpu: T4, L4, A10, A100-40, A100-80, H100, H200, a size in GB, or cpu (the default: this machine). No weights are
loaded: the model's shape comes from the recipe's real configuration (common/training/shapes.py) and the sequence
length from the prepared split when `make prepare` has run, else train.max_length. Prints one table and writes
outputs/<run>/plan.json: training (predicted_peak_gb, fits, micro_batch, seconds_per_step, components, advice:
the cheapest change that makes it fit, in the order shorter train.max_length, smaller micro-batch, gradient
checkpointing, 4-bit, a larger device) and the merge and export steps' RAM (with a verdict against the host's RAM
where it is known: Colab's 12.7 GB for a T4, this machine's for cpu) and disk.
"""
from __future__ import annotations

import sys
from typing import Any

from common.core import config, io, paths
from common.training import fit, footprint, shapes

NOTES = {"overlap": "   (checkpointing: the logits are freed before the first layer is recomputed)",
         "reference": "   (the no-grad reference forward of dpo/ipo)"}


def table(cfg: Any, p: dict) -> str:
    s = p["settings"]
    fit = "fits" if p["fits"] else "DOES NOT FIT"
    rows = [f"plan for {cfg.run} on {p['device']} ({p['device_memory_gb']} GiB): {fit}",
            (f"  model      {p['parameters'] / 1e9:.3f}B parameters ({p['shape']['source']}), "
            f"{p['trainable_parameters'] / 1e6:.2f}M trainable"),
            (f"  settings   {s['precision']}, {s['quantization_bits'] or 'no'}-bit, frozen {s['frozen_dtype']}, "
            f"{s['optim']}, checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
            f"{'padding-free' if s['padding_free'] else 'padded'}, longest example {s['longest_example']} tokens"),
            f"  lengths    {s['lengths_from']}",
            (f"  micro      {p['micro_batch']}" + (" pairs" if s["preference_pairs"] else "")
             + f" ({p['tokens_per_micro_batch']} tokens, the longest examples together), largest that fits: "
             f"{p['largest_micro_batch'] or 'none'}")]
    rows += [f"  {k:<12} {v:8.2f} GiB" + NOTES.get(k, "") for k, v in p["components"].items() if v]
    rows.append(f"  {'peak':<12} {p['predicted_peak_gb']:8.2f} GiB   ~{p['seconds_per_step']:g} s per optimizer step")
    for a in p["advice"]:
        rows.append(f"  to fit: {a['change']}: --set {a['set']}" if not a["set"].startswith("GPU=")
                    else f"  to fit: {a['change']}: {a['set']}")
        rows[-1] += f" (predicted {a['predicted_peak_gb']:.2f} GiB)"
    for step, d in p["steps"].items():
        disk = d.get("disk_gguf_gb") or {"merged/": d["disk_merged_gb"]}
        gpu = f", GPU {d['gpu_gb']:.2f} GiB" if "gpu_gb" in d else ""
        host = ("" if d["ram_fits"] is None else f" ({'fits' if d['ram_fits'] else 'DOES NOT FIT'} "
                f"{d['host_ram_gb']} GB RAM)")
        rows.append(f"  {step:<12} RAM {d['ram_gb']:.2f} GiB{host}{gpu}, disk "
                    + ", ".join(f"{k} {v:.2f} GiB" for k, v in disk.items()))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = config.recipe_parser("Predict a recipe's peak memory and time per step on a device.")
    ap.add_argument("--gpu", default="cpu", help="T4, L4, A10, A100-40, A100-80, H100, H200, a size in GB, or cpu")
    args = ap.parse_args(argv)
    try:
        cfg = config.load(args.recipe, args.sets, args.tiny)
        footprint.device_info(args.gpu)
        shape = shapes.shape_of(cfg)
        p = fit.predict(cfg, args.gpu, shape)
    except (config.ConfigError, ValueError, io.UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p["recipe"], p["run"] = cfg.name, cfg.run
    p["steps"] = fit.later_steps(cfg, shapes.parameters(shape)["total"], p["device"])
    out = paths.RunPaths(cfg.run).plan
    out.parent.mkdir(parents=True, exist_ok=True)
    io.atomic_write_json(out, p)
    print(table(cfg, p))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
