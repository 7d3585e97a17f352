"""Test-wide settings: markers, and the benchmark options.

`gpu` marks the benchmark suites in benchmarks/ (benchmarks/conftest.py skips them, with the reason,
without CUDA; `--device cpu` runs them CPU-sized); `slow` marks tests that load the embedded
pretrained model (they still run in CI).
"""

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA unless run with --device cpu (benchmarks)")
    config.addinivalue_line("markers", "slow: loads the embedded pretrained model (SmolLM2-135M)")
    # On xdist workers (-n N, which sets --dist load), the groups below share a worker (--dist loadgroup). Set here
    # and only then: a --dist in addopts would make pytest-benchmark disable the benchmarks of a plain run.
    if config.getoption("numprocesses", None) and config.getoption("dist", "no") == "load":
        config.option.dist = "loadgroup"
    if getattr(config, "workerinput", {}).get("h2o_loadgroup"):  # a worker re-parses its options: tell it
        config.option.loadgroup = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):  # pytest-xdist, on the controller: what each worker is told at its start
    node.workerinput["h2o_loadgroup"] = node.config.getoption("dist", "no") == "loadgroup"


def pytest_addoption(parser):
    # Registered here, not only in benchmarks/conftest.py, so that `pytest -m gpu --device cpu` works
    # from the root: pytest parses the command line before it loads benchmarks/conftest.py.
    group = parser.getgroup("h2o benchmarks")
    group.addoption("--device", default=os.environ.get("H2O_BENCH_DEVICE", "cuda"),
                    help="device for benchmarks/: cuda (default; env H2O_BENCH_DEVICE) or cpu (CPU-sized runs)")
    group.addoption("--bench-model", default="smollm2-135m",
                    help="model for the PPL suite (default smollm2-135m; its gates were measured on it)")


# Under pytest-xdist (`-n 2`, the CI command), tests that share an expensive set-up share one worker: the Ray tests
# (two local Ray clusters started at once on a 2-core machine would only fight over its cores) and the tests that
# load the embedded GGUF (30 s per worker that loads it). A group is one unit of work for xdist, which hands out the
# largest first: these two run from the start, not as the suite's tail.
SERIAL_GROUPS = {"test_units": "ray", "test_eval_models": "gguf"}


def _group(item) -> str | None:
    return SERIAL_GROUPS.get(item.module.__name__.rpartition(".")[2])


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the xdist_group marks into the node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _group(item):
            item.add_marker(pytest.mark.xdist_group(_group(item)))


def pytest_collection_finish(session):
    """Say so when the groups above are not in force (pytest-xdist's loadgroup marks a grouped test by a suffix of its
    node id; pytest 9.2 ignores the change, pytest-xdist#1386): the suite still passes, slower, with two Ray clusters
    at once."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items if _group(item) and "@" not in item.nodeid]
    if lost:
        import warnings

        warnings.warn(f"pytest-xdist did not group {len(lost)} test(s) (e.g. {lost[0]}): this pytest breaks its "
                      "loadgroup (pytest-xdist#1386); pip install 'pytest<9.2' (the test extra pins it)", stacklevel=1)


def _share_the_cores_between_xdist_workers():
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores_between_xdist_workers()
