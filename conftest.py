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


def pytest_collection_modifyitems(config, items):
    # Under pytest-xdist (`-n 2`, the CI command), the Ray tests share one worker: two local Ray clusters
    # started at once on a 2-core machine would only fight over its cores.
    import pytest

    for item in items:
        if item.module.__name__.endswith("test_units"):
            item.add_marker(pytest.mark.xdist_group("ray"))


def _share_the_cores_between_xdist_workers():
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores_between_xdist_workers()
