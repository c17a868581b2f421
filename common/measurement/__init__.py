"""Measurement: how fast and how much memory, never what a run computes. `make bench` (rows, measuring, tables),
one profiled step, and `make gpu-check` (budgeted parts and their report). It imports the pipeline stages to run
them; no pipeline stage imports it."""
