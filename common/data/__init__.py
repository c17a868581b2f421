"""Data: raw files in, processed splits out. File readers and the report of dropped rows, sampling and splitting,
the chat templates a recipe can name, and the token-level encoding of chats and seq2seq pairs that training,
evaluation, the demo and the bench share. It hands train/val/test.jsonl (messages, not tokens) and the encoders to
the model and training stages, and knows nothing of models or training."""
