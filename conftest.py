"""Test-wide settings: markers, and GPU tests skipped (with the reason) where CUDA is absent.

`gpu` marks the benchmark suites in benchmarks/ (see benchmarks/conftest.py: `--device cpu` runs
them CPU-sized); `slow` marks tests that load the embedded pretrained model (they still run in CI).
"""

import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA unless run with --device cpu (benchmarks)")
    config.addinivalue_line("markers", "slow: loads the embedded pretrained model (SmolLM2-135M)")
    torch.set_num_threads(torch.get_num_threads())  # respect OMP_NUM_THREADS; no oversubscription tricks
