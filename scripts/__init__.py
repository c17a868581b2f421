"""Pipeline steps; each runs as `python scripts/NN_name.py` or `python -m scripts.NN_name`."""
