"""Library code of the pipeline scripts: paths, config, io, metadata, run (CLI), data, tasks/, arch, modeling,
prompts, templates, training, metrics, evaluation. The numbered scripts stay thin and call these."""
