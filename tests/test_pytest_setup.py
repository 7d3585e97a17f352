"""The project's pytest settings: the benchmarks measure in a plain run, and the CI's groups are in force on workers."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_plain_run_under_the_projects_settings_measures_its_benchmarks(tmp_path):
    """`pytest -m gpu --benchmark-json out.json`: any --dist in the settings' addopts would make pytest-benchmark
    disable every benchmark (each then runs once, unmeasured, and the suites' figures are gone)."""
    (tmp_path / "test_probe.py").write_text(
        "def test_probe(benchmark):\n"
        "    benchmark.pedantic(lambda: None, rounds=2, iterations=1)\n"
        "    assert benchmark.stats is not None, 'benchmarks disabled'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                          str(tmp_path / "test_probe.py"), "-q", "-p", "no:cacheprovider",
                          "--benchmark-json", str(tmp_path / "out.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "automatically disabled" not in run.stdout + run.stderr
    assert (tmp_path / "out.json").stat().st_size > 0


def test_on_xdist_workers_the_serial_groups_share_a_worker(request):
    """Under `-n N` (the CI command) each test of tests/test_units.py carries the Ray group: pytest-xdist's loadgroup
    reads it into the node id. Alone (no workers) there are no groups to keep."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        assert request.config.getoption("dist", "no") == "no"
        return
    assert request.config.option.loadgroup
    ray_tests = [item for item in request.session.items if item.module.__name__.endswith("test_units")]
    assert all(item.nodeid.endswith("@ray") for item in ray_tests), [i.nodeid for i in ray_tests][:2]
