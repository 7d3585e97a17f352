"""The harness's layout, as a newcomer looks for it: each `h2o` command in a module of its own named as the command
(`h2o/eval/commands/`), over the shared harness beneath it; no command imports another, no import circle among the
harness's modules (counting imports inside functions too), and no two modules of one name at two levels."""

import ast
from collections import Counter
from pathlib import Path

from h2o.eval import cli

ROOT = Path(__file__).resolve().parents[1] / "h2o"
EVAL = ROOT / "eval"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every h2o module `path` imports, at the top or inside a function (relative imports resolved)."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    known = {_module(p) for p in ROOT.rglob("*.py")}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out - {_module(path)}


def test_every_command_is_a_module_of_its_own_named_as_the_command():
    files = {p.stem for p in (EVAL / "commands").glob("*.py") if p.name != "__init__.py"}
    assert files == set(cli.COMMANDS)
    for name in cli.COMMANDS:
        text = (EVAL / "commands" / f"{name}.py").read_text()
        assert f'NAME = "{name}"' in text


def test_no_command_imports_another_command():
    commands = {f"h2o.eval.commands.{name}" for name in cli.COMMANDS}
    for name in cli.COMMANDS:
        own = f"h2o.eval.commands.{name}"
        assert not (_imports(EVAL / "commands" / f"{name}.py") & commands) - {own}, name
    harness = [p for p in EVAL.glob("*.py") if p.name != "cli.py"]  # cli imports commands by name, on demand
    for path in harness:
        assert not _imports(path) & commands, f"{path.name} (the harness) imports a command"


def _assert_no_circle(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert len(state) == len(graph)


def _graph(keep) -> dict[str, set[str]]:
    """Imports among the modules `keep` admits; a module's import of its own parent package is not an edge."""
    graph = {_module(p): _imports(p) for p in ROOT.rglob("*.py")}
    return {m: {d for d in deps if keep(d) and d in graph and not m.startswith(d + ".")}
            for m, deps in graph.items() if keep(m)}


def test_the_harness_has_no_import_circle():
    graph = _graph(lambda m: m.startswith("h2o.eval"))
    assert len(graph) > 20
    _assert_no_circle(graph)


def test_the_library_has_no_import_circle():
    """The library below the harness: each module imports only what stands below it (attention -> cache -> static ->
    the layer kinds -> compressed_layer, with the hand-over and the shared attention math beneath them all)."""
    graph = _graph(lambda m: m.startswith("h2o") and not m.startswith("h2o.eval"))
    assert {"h2o.attention", "h2o.cache", "h2o.static", "h2o.handover", "h2o.attention_kernels"} <= set(graph)
    _assert_no_circle(graph)
    assert not graph["h2o.static"] & {"h2o.cache", "h2o.attention"}


LAYER_KINDS = {"h2o.cache", "h2o.compressed_layer", "h2o.head_group_layer", "h2o.rows_layer", "h2o.static",
               "h2o.shared_budget"}


def test_the_attention_function_imports_no_layer_kind():
    """Issue 29: the attention function calls each layer kind through one protocol (`h2o.handover.AttendingLayer`);
    it imports none of them, and every layer kind gives that protocol."""
    graph = _graph(lambda m: m.startswith("h2o") and not m.startswith("h2o.eval"))
    assert LAYER_KINDS <= set(graph)
    assert not graph["h2o.attention"] & LAYER_KINDS, graph["h2o.attention"]
    from h2o.compressed_layer import CompressedLayer
    from h2o.handover import AttendingLayer
    from h2o.head_group_layer import HeadGroupLayer
    from h2o.rows_layer import RowsLayer
    from h2o.static import StaticLayer
    for kind in (CompressedLayer, HeadGroupLayer, RowsLayer, StaticLayer):
        assert "attend" in vars(kind), kind
        assert issubclass(kind, AttendingLayer)


def test_no_two_modules_of_one_name_at_two_levels():
    names = Counter(p.name for p in ROOT.rglob("*.py") if p.name != "__init__.py")
    assert [n for n, count in names.items() if count > 1] == []
