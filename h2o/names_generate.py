"""`python -m h2o.names_generate`: write h2o/names_table.py (the names the `h2o` command checks before torch,
`h2o.names`) from the registry; `--check`: only say whether it is current (exit 1 if not). Kept apart from
`h2o.names`, which the registry imports, so that no module imports its importer."""

from __future__ import annotations

import re
import sys

from . import policies
from .names import TABLE_FILE, Table
from .policies.allocations import plan


def from_registry(builtin_only: bool = True) -> Table:
    """The registry's table (imports torch); `builtin_only`: the package's rules and allocations, not a user's."""

    def taken(c) -> bool:
        return not builtin_only or c.__module__.startswith("h2o.")

    rules = {}
    for name, c in policies.registered().items():
        if taken(c):
            if c.PATTERN is None and builtin_only:
                raise ValueError(f"{c.__name__} has no PATTERN: a built-in rule's names need a regex (h2o.names)")
            rules[name] = (c.GRAMMAR, c.EXAMPLE, None if c.PATTERN is None else re.escape(c.NAME) + c.PATTERN)
    allocations = {n: (c.grammar(n), c.example(n)) for n, c in plan.registered_allocations().items() if taken(c)}
    families = tuple(f for f in policies.families() if f == "recommended" or f.partition("_")[0] in rules)
    decode_rules = tuple(n for n in policies.decode_rules() if n in rules)
    return Table(rules, allocations, plan._NAME.pattern, families, decode_rules)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    source = from_registry().source()
    current = TABLE_FILE.read_text() if TABLE_FILE.exists() else None
    if source == current:
        print(f"{TABLE_FILE}: current")
        return 0
    if "--check" in argv:
        print(f"{TABLE_FILE}: out of date with the registry: run python -m h2o.names_generate", file=sys.stderr)
        return 1
    TABLE_FILE.write_text(source)
    print(f"{TABLE_FILE}: written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
