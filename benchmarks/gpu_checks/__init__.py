"""The sections of benchmarks/gpu_acceptance.py: each measures one GPU target and returns a dict of results."""
