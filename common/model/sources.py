"""Where a model comes from: a hub id, a local folder, or a GGUF file inside a folder or an installed Python package
(converted once to a plain Hugging Face folder under the cache), and the one-line error when it cannot be had."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

from common.core import paths
from common.core.io import UserError, atomic_dir

log = logging.getLogger("ft")


def local_dir(name: str) -> Path | None:
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if name.startswith(("/", "./", "../", "~")) or os.sep in name and p.parent.exists() and len(p.parts) > 2:
        raise UserError(f"model path {name} does not exist; fix model.name_or_path (--set model.name_or_path=DIR)")
    return None


def gguf_dir(name: str) -> Path:
    local = local_dir(name)
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
    out = paths.cache_root() / "models" / f"{src.stem}-{key}"
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


def hub_error(name: str, e: Exception) -> UserError:
    return UserError(f"could not load '{name}' ({type(e).__name__}: {str(e).splitlines()[0][:160]}); without "
                     f"the hub, download it elsewhere and use --set model.name_or_path=/path/to/folder")
