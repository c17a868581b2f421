"""Shipping: what leaves the repository and the gates that check it exactly as the next step loads it. Parity of
the merged model and of each GGUF file with what they came from, GGUF files with an Ollama Modelfile, model cards,
the one-page report across runs, and the push to the hub. Nothing in the pipeline imports it back."""
