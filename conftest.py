"""Test-wide settings: the markers. (benchmarks/conftest.py skips `gpu` suites, with the reason, without CUDA.)

`gpu` marks the benchmark suites in benchmarks/ (see benchmarks/conftest.py: `--device cpu` runs
them CPU-sized); `slow` marks tests that load the embedded pretrained model (they still run in CI).
"""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA unless run with --device cpu (benchmarks)")
    config.addinivalue_line("markers", "slow: loads the embedded pretrained model (SmolLM2-135M)")
