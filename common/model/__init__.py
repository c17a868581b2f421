"""Model: where a model comes from (hub id, local folder, GGUF in a package, tiny stand-in), how it and its
tokenizer are loaded, the architecture seam (causal vs seq2seq), dtypes, the GGUF tokenizer as llama.cpp applies
it, and batched greedy generation. It hands a loaded model and tokenizer to training, evaluation and shipping, and
knows nothing of training."""
