"""Benchmarks and experiments, beside the package (as torchvision keeps references/), using its public API only.

`throughput` (what `make bench` runs): segmill's bulk job against plain programs and Ray's documented pattern;
`bootstrap_experiment` (`make experiment`): hard-class training measured. Results live in docs/.
"""
