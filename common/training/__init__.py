"""Training: the run plan (device, precision, quantization, micro-batches, schedule), LoRA on the planned model,
the trainer of each architecture with this project's loss, padding-free attention, and what training leaves to read
(progress, train_log.csv, loss.png). It hands outputs/<run>/adapter/ with run_info.json to evaluation and shipping."""
