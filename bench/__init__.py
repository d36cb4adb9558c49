"""Benchmarks and experiments, beside the package (as torchvision keeps references/), using its public API only.

`throughput` (`make bench`): segmill's bulk job against plain programs and Ray's documented pattern; `training`
(`make bench-train`): the retraining job against a plain PyTorch loop; `hard_classes` (`make experiment`):
hard-class training measured on CamVid. Results live in docs/.
"""
