"""Test-wide settings: markers, and the benchmark options.

`gpu` marks the benchmark suites in benchmarks/ (benchmarks/conftest.py skips them, with the reason,
without CUDA; `--device cpu` runs them CPU-sized); `slow` marks tests that load the embedded
pretrained model (they still run in CI).
"""

import os


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA unless run with --device cpu (benchmarks)")
    config.addinivalue_line("markers", "slow: loads the embedded pretrained model (SmolLM2-135M)")


def pytest_addoption(parser):
    # Registered here, not only in benchmarks/conftest.py, so that `pytest -m gpu --device cpu` works
    # from the root: pytest parses the command line before it loads benchmarks/conftest.py.
    group = parser.getgroup("h2o benchmarks")
    group.addoption("--device", default=os.environ.get("H2O_BENCH_DEVICE", "cuda"),
                    help="device for benchmarks/: cuda (default; env H2O_BENCH_DEVICE) or cpu (CPU-sized runs)")
    group.addoption("--bench-model", default="smollm2-135m",
                    help="model for the PPL suite (default smollm2-135m; its gates were measured on it)")
