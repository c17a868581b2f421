"""Library code of the pipeline scripts, one subpackage per stage, each handing files or objects to the next:
core (configuration and run plumbing) -> data -> model -> training -> evaluation -> shipping, with tasks/ (what a
recipe teaches) and measurement/ (bench, profiling, gpu-check) beside them. tests/test_layout.py holds the rule of
which stage may import which. The numbered scripts stay thin and call these."""
