"""GGUF export at real size: the writer holds one block of one weight at a time, never the whole file, and writes
the rope base the model runs with, never a guessed one."""
from __future__ import annotations

import tracemalloc

import pytest

from common.core import paths
from common.model import standins
from common.shipping import export

MIB = 1 << 20


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A random-init 4-layer Llama saved as merge saves it (fp16 safetensors): 13M parameters, a 25 MB file whose
    largest weights (the embeddings, 8 MB in f16) are many times one 48 KiB block."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=16384,
                                tie_word_embeddings=False, rope_theta=5e5)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("merged")
    AutoModelForCausalLM.from_config(conf).half().save_pretrained(folder)  # fp32 init: fast on CPU
    return folder, conf


def write(folder, conf, quant, path, meta=None):
    meta = meta or tok_meta(conf)
    return export.write_gguf(path, folder, conf, meta, quant, {"name": "m", "description": "memory"})


def tok_meta(conf):
    return {"model": "gpt2", "pre": "default", "tokens": [f"t{i}" for i in range(conf.vocab_size)],
            "token_types": [1] * conf.vocab_size, "merges": [], "ids": {"bos": 0, "eos": 1}, "add_bos": False,
            "add_eos": False}


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_the_gguf_writer_holds_one_block_not_the_file(llama_folder, quant, tmp_path, monkeypatch):
    """The memory write_gguf allocates (numpy and Python, traced) peaks below 4 MiB for a 25 MB model (a writer
    holding every converted tensor until the end peaks at 26 to 29 MiB here, one converting a whole weight at once
    at 26 MiB), and the file is byte for byte the one written a whole weight at a time (blocks of whole heads for
    llama's permuted q/k rows)."""
    folder, conf = llama_folder
    monkeypatch.setattr(export, "CHUNK_BYTES", 48 * 1024)
    meta = tok_meta(conf)
    tracemalloc.start()
    try:
        written = write(folder, conf, quant, tmp_path / "blocks.gguf", meta)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert written["bytes"] > 12e6 and written["tensors_by_type"][quant] == 4 * 7 + 2
    assert peak < 4 * MIB, f"write_gguf held {peak / MIB:.0f} MiB writing a {written['bytes'] / MIB:.0f} MiB file"
    monkeypatch.setattr(export, "CHUNK_BYTES", 1 << 40)  # one block per weight
    write(folder, conf, quant, tmp_path / "whole.gguf")
    assert (tmp_path / "blocks.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()


def test_merged_weights_are_read_in_blocks_as_torch_reads_them(tmp_path):
    """bf16, f16 and f32 weights come back in blocks of whole rows as torch widens them to float32, bias included,
    and a permuted q projection in blocks of whole heads equals the whole weight permuted."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    saved = {"q.weight": torch.randn(64, 48).to(torch.bfloat16), "up.weight": torch.randn(37, 64).half(),
             "norm.weight": torch.randn(64), "q.bias": torch.randn(64).to(torch.bfloat16)}
    save_file(saved, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for name, w in export.read_tensors(tmp_path):
        want = saved[name].float().numpy()
        if name.startswith("q."):
            w.heads, want = 4, export.permute_rope(want, 4)
        blocks = list(w.blocks(1000))
        assert np.array_equal(np.concatenate(blocks), want), name
        assert len(blocks) == (1 if w.ndim == 1 else {"q.weight": 4, "up.weight": 13}[name]), name


def test_the_rope_base_is_the_one_transformers_runs_with_never_a_guess():
    """Every real configuration's rope_theta is written as it is (Qwen's 1e6, Llama-3's 5e5); a config.json without
    one gets its model type's own transformers default (transformers 5 fills rope_parameters); a config whose rope
    parameters lack it is refused in one line naming the key, not exported with 10000."""
    from transformers import AutoConfig

    for path in sorted(paths.MODEL_CONFIGS_DIR.glob("*.json")):
        raw = standins.real_config(path.stem)
        if raw["model_type"] in export.GGUF_ARCH:
            conf = AutoConfig.for_model(raw.pop("model_type"), **raw)
            assert export.rope_theta(conf) == raw.get("rope_theta", type(conf).default_theta), path.name
    for model_type in export.GGUF_ARCH:
        conf = AutoConfig.for_model(model_type)
        assert export.rope_theta(conf) == type(conf).default_theta == 10000.0
        conf.rope_parameters = {"rope_type": "default"}
        with pytest.raises(export.Unsupported, match=f"the {model_type} config has no rope_theta") as e:
            export.rope_theta(conf)
        assert "\n" not in str(e.value)
