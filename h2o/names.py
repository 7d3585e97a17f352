"""Policy, rule-family and allocation names, checked without torch: the `h2o` command refuses a misspelt or malformed
name while it reads its arguments, before anything heavy is imported (issue 42), in the registry's own words.

The registry (`h2o.policies`: `register_policy`, `register_allocation`) is the one source of the names, and it imports
torch. `h2o/names_table.py` is generated from it: each built-in rule's NAME, GRAMMAR, EXAMPLE and the regex of its names
(NAME + `Policy.PATTERN`, which its `from_name` reads), each built-in allocation's name, grammar and example, the regex
of an allocation's name and the rule families. After adding or changing a rule or an allocation, regenerate it:

    python -m h2o.names_generate

(`python -m h2o.names_generate --check` only says whether it is current; tests/test_names.py fails while the table and the
registry disagree.) The messages for a name that spells nothing (`unknown_policy`, `unknown_family`) and for sizes that
do not fit (`size_error`) are written here once, for the registry and this check alike.

What is checked before torch: a name's shape (a rule's regex, `<allocation>+<rule>`, `recommended_<budget>`, an
allocation's parameters being numbers) and the sizes every sized rule shares (sinks and recent >= 0, budget > 0,
sinks + recent <= budget). A rule's or an allocation's own constraints (H2O's scoring-rule word, SnapKV's window,
A2SF's gamma, the rule after `+`, an allocation's ranges and number of parameters) are the registry's: a name that
breaks only those passes here and is refused when the command checks it, as before.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

RECOMMENDED = ("recommended_<budget>", "recommended_256")  # h2o.recommended(budget) by name: grammar, example
RECOMMENDED_PATTERN = r"recommended_(\d+)"
EVERY = "every name: h2o.policy_names() (or `h2o --help`)"
TABLE_FILE = Path(__file__).with_name("names_table.py")


def size_error(sinks: int, recent: int, budget: int, recent_name: str = "recent") -> str | None:
    """What is wrong with a rule's sizes, or None (`h2o.policies.check_sizes` raises it)."""
    if sinks < 0 or recent < 0:
        return f"sinks and {recent_name} must be >= 0 (got {sinks}, {recent})"
    if budget <= 0:
        return f"budget must be > 0 (got {budget})"
    if sinks + recent > budget:
        return f"sinks + {recent_name} ({sinks} + {recent}) exceeds the budget {budget}"
    return None


# --- the table --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    """What the registry knows of names: `rules` NAME -> (GRAMMAR, EXAMPLE, the regex of its names, None for a rule
    without PATTERN), in registration order (the order `h2o.parse` tries them); `allocations` name -> (grammar,
    example); `allocation_pattern` the regex of an allocation's name (its word, then its numbers); `families`
    (`h2o.policies.families()`); `decode_rules`, those a rule's `+<rule>` may name (`h2o.policies.decode_rules()`)."""

    rules: Mapping[str, tuple[str, str, str | None]]
    allocations: Mapping[str, tuple[str, str]]
    allocation_pattern: str
    families: tuple[str, ...]
    decode_rules: tuple[str, ...]

    @classmethod
    def generated(cls) -> Table:
        """The table of h2o/names_table.py (no torch)."""
        from . import names_table as t

        return cls(t.RULES, t.ALLOCATIONS, t.ALLOCATION_PATTERN, t.FAMILIES, t.DECODE_RULES)

    def source(self) -> str:
        """The text of h2o/names_table.py that holds this table."""
        out = ['"""Generated from the registry (h2o.policies) by `python -m h2o.names_generate`: do not edit. The built-in',
               "rules, allocations and rule families for the `h2o` command's check of names before torch is imported",
               '(h2o.names); tests/test_names.py holds it to the registry."""', "",
               "# NAME: (GRAMMAR, EXAMPLE, the regex of its names: NAME + PATTERN), in registration order (the order",
               "# h2o.parse tries them)", "RULES = {"]
        for n, (g, e, p) in self.rules.items():
            out += [f"    {_literal(n)}: ({_literal(g)}, {_literal(e)},", f"        {_literal(p)}),"]
        out += ["}", "# name: (grammar, example), in registration order", "ALLOCATIONS = {"]
        out += [f"    {_literal(n)}: ({_literal(g)}, {_literal(e)})," for n, (g, e) in self.allocations.items()]
        out += ["}", "# an allocation's name: its word, then its numbers",
                f"ALLOCATION_PATTERN = {_literal(self.allocation_pattern)}",
                "# h2o.policies.families()", "FAMILIES = (", *_wrapped(self.families), ")",
                "# h2o.policies.decode_rules(): what snapkv_..+<rule> and kvzip_..+<rule> may name",
                "DECODE_RULES = (", *_wrapped(self.decode_rules), ")", ""]
        return "\n".join(out)


def _wrapped(words: Iterable[str], width: int = 116) -> list[str]:
    """Lines of a tuple's items, indented, none wider than `width`."""
    lines, line = [], "   "
    for word in words:
        if len(line) + len(_literal(word)) + 2 > width:
            lines.append(line)
            line = "   "
        line += f" {_literal(word)},"
    return lines + [line]


def _literal(value: str | None) -> str:
    """A Python literal of `value` in double quotes (a raw string where it holds a backslash: a regex), else repr."""
    text = repr(value)
    if isinstance(value, str) and '"' not in value and not value.endswith("\\") and value.isprintable():
        text = f'r"{value}"' if "\\" in value else f'"{value}"'
    assert eval(text) == value  # noqa: S307 (our own literal)
    return text


@lru_cache(maxsize=1)
def table() -> Table:
    """The generated table (h2o/names_table.py), read once."""
    return Table.generated()


def _grammars(t: Table) -> dict[str, str]:
    return {grammar: example for grammar, example, _ in t.rules.values()}


# --- the checks -------------------------------------------------------------------------------------------------------

def split(name: str, t: Table | None = None) -> tuple[str, str] | None:
    """("<allocation>", "<rule>") of a name "<allocation>+<rule>", or None if it does not start with an allocation
    (`h2o.policies.allocation.split`)."""
    t = t or table()
    head, plus, rest = name.partition("+")
    m = re.fullmatch(t.allocation_pattern, head)
    return (head, rest) if plus and m and m[1] in t.allocations else None


def allocation_error(text: str, t: Table | None = None) -> str | None:
    """Why `text`, the "<allocation>" of a name "<allocation>+<rule>" that `split` gave, is refused, or None
    (`h2o.policies.allocation.parse_allocation`: its parameters must be numbers)."""
    t = t or table()
    m = re.fullmatch(t.allocation_pattern, text)
    if not m or m[1] not in t.allocations:
        raise ValueError(f"{text!r} is not the <allocation> of a name split by h2o.names.split")
    try:
        [float(a) for a in m[2].split("_") if a]
    except ValueError:
        return f"bad allocation {text!r}: its parameters must be numbers"
    return None


def policy_error(spec: str, t: Table | None = None) -> str | None:
    """Why `spec` names no policy, in the registry's words (`h2o.parse`), or None: it may name one (the registry has
    the last word). kvpress names (kvpress:...) are not ours: the caller leaves them to their own check."""
    t = t or table()
    parts = split(spec, t)
    if parts:
        return allocation_error(parts[0], t) or policy_error(parts[1], t)
    if re.fullmatch(RECOMMENDED_PATTERN, spec):
        return None
    for grammar, example, pattern in t.rules.values():
        if pattern is None:  # a rule that reads its names its own way (a user's, in a table of the live registry)
            return None
        m = re.fullmatch(pattern, spec)
        if m and m.groupdict().get("then") is not None:  # <rule>_<sizes>..+<then><rest>: then at the same sizes
            return (policy_error(f"{m['then']}_{m['sinks']}_{m['recent']}_{m['budget']}{m['rest']}", t)
                    if m["then"] in t.decode_rules else None)  # (another word: the rule's own message, later)
        if m:
            return _sizes(m.groupdict())
    return unknown_policy(spec, _grammars(t), t.allocations, splits=False)


def _sizes(groups: dict[str, str | None]) -> str | None:
    """`size_error` of a name's size groups: sinks, recent and budget; or sinks and window (budget = their sum)."""
    if groups.get("sinks") is None:
        return None
    sinks = int(groups["sinks"])
    if groups.get("recent") is not None and groups.get("budget") is not None:
        return size_error(sinks, int(groups["recent"]), int(groups["budget"]))
    if groups.get("window") is not None and groups.get("budget") is None:
        window = int(groups["window"])
        return size_error(sinks, window, sinks + window, "window")
    return None


def is_family(name: str, t: Table | None = None) -> bool:
    """A rule family, or one under an allocation: "<allocation>+<family>" (`h2o.policies.is_family`)."""
    t = t or table()
    parts = split(name, t)
    return (parts[1] if parts else name) in t.families


def family_error(name: str, t: Table | None = None) -> str | None:
    """Why `name` is no rule family (sweep's --rules, tasks' --policies), or None (`h2o.policies.at_budget`)."""
    t = t or table()
    if not is_family(name, t):
        return unknown_family(name, t.families, t.allocations, splits=split(name, t) is not None)
    parts = split(name, t)
    return allocation_error(parts[0], t) if parts else None


# --- the words --------------------------------------------------------------------------------------------------------

def unknown_policy(spec: str, grammars: Mapping[str, str] | None = None, allocations: Iterable[str] | None = None,
                   splits: bool | None = None) -> str:
    """Why `spec` names no policy, and what to write instead: the grammar of the rule it starts with, or the names
    it is closest to ("did you mean"), never the whole grammar. `grammars`: {grammar: example} of every rule
    (`h2o.policy_names()`), `allocations`: every allocation's name, `splits`: whether `spec` is
    "<allocation>+<rule>" (`split`); default: as the generated table says."""
    t = table() if grammars is None or allocations is None or splits is None else None
    grammars = _grammars(t) if grammars is None else grammars
    allocations = sorted(t.allocations if allocations is None else allocations)
    splits = split(spec, t) is not None if splits is None else splits
    by_rule = {g.partition("_")[0]: (g, e) for g, e in grammars.items()}
    by_rule["recommended"] = RECOMMENDED
    head, plus, rest = spec.partition("+")
    if plus and not splits and head.partition("_")[0] not in by_rule:
        word = head.partition("_")[0]
        close = difflib.get_close_matches(word, allocations, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c + head[len(word):] + '+' + rest) for c in close)}? " if close else ""
        return (f"unknown policy {spec!r}: {head!r} is no allocation; {hint}allocations: "
                f"{', '.join(allocations)} (e.g. 'retrieval_0.1_4+h2o_4_32_256'); {EVERY}")
    word = spec.partition("_")[0]
    if word in by_rule:
        grammar, example = by_rule[word]
        return (f"unknown policy {spec!r}: {word} names are {grammar} (e.g. {example!r}), every size a whole number "
                f">= 0; {EVERY}")
    close = difflib.get_close_matches(word, sorted(by_rule), n=3, cutoff=0.6)
    if close:
        hint = " or ".join(f"{by_rule[c][0]!r} (e.g. {by_rule[c][1]!r})" for c in close)
        return f"unknown policy {spec!r}: did you mean {hint}? {EVERY}"
    return (f"unknown policy {spec!r}: rules are {', '.join(sorted(by_rule))} (e.g. 'h2o_4_32_256'), head and layer "
            f"budgets '<allocation>+<rule>' (e.g. 'adakv+h2o_4_32_256'); {EVERY}")


def unknown_family(name: str, families: Iterable[str] | None = None, allocations: Iterable[str] | None = None,
                   splits: bool | None = None) -> str:
    """Why `name` is no rule family, and the families it is closest to ("did you mean"). `families`
    (`h2o.policies.families()`), `allocations` (their names) and `splits` (whether `name` is "<allocation>+<family>",
    `split`) default to what the generated table says."""
    families = list(table().families if families is None else families)
    allocations = sorted(table().allocations if allocations is None else allocations)
    splits = split(name) is not None if splits is None else splits
    head, plus, rest = name.partition("+")
    if plus:  # <allocation>+<family>: each part as written where it is right, else the closest
        word = head.partition("_")[0]
        heads = [head] if splits else [c + head[len(word):] for c in
                                       difflib.get_close_matches(word, allocations, n=3, cutoff=0.6)]
        rests = [rest] if rest in families else difflib.get_close_matches(rest, families, n=3, cutoff=0.6)
        close = [f"{h}+{r}" for h in heads for r in rests][:3]
    else:
        close = difflib.get_close_matches(name, families, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    return (f"unknown rule family {name!r}: {hint}families: {', '.join(families)}; or one under an allocation, "
            f"<allocation>+<family> ({', '.join(allocations)}), e.g. adakv+h2o_mean")
