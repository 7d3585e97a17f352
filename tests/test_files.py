"""`h2o.files.atomic_path`: what the library and the commands save is the old file or the whole new one."""

import pytest

from h2o.files import atomic_path


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "scores.json"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp != path and not path.exists()
        tmp.write_text("new")
    assert path.read_text() == "new" and [p.name for p in path.parent.iterdir()] == ["scores.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "plot.png"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path, suffix=".tmp.png") as tmp:
            assert tmp.name.endswith(".tmp.png")  # a writer that reads the format from the name gets it
            tmp.write_text("half")
            raise RuntimeError("the writer failed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]
