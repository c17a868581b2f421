"""Shared pieces of the pipeline scripts: paths, recipe loading, run helpers, models, tasks."""
