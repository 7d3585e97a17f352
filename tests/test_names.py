"""The torch-free name check of the `h2o` command (`h2o.names`) against the registry it is generated from (issue 42):
the generated table is the registry's, every example is accepted by both, and a malformed name is refused by both in
the same words ("did you mean" included). Regenerate the table with `python -m h2o.names_generate`."""

import itertools
import random

import pytest

import h2o
from h2o import names, names_generate
from h2o.names import Table
from h2o.policies import allocation

REGENERATE = "h2o/names_table.py is not the registry's: regenerate it with `python -m h2o.names_generate`"


@pytest.fixture(scope="module")
def live() -> Table:
    """The live registry's table, user rules and allocations included (test_user_allocation.py registers `halves` at
    its import, so where the whole suite runs the registry's messages name it): the messages are compared with the
    registry's through it; the generated table equals its built-in part (`test_the_table_is_the_registrys`)."""
    return names_generate.from_registry(builtin_only=False)


def registry_refusal(call, *args) -> str | None:
    try:
        call(*args)
    except ValueError as error:
        return str(error)
    return None


def test_the_table_is_the_registrys():
    """Every built-in rule's NAME, GRAMMAR, EXAMPLE and name regex, every built-in allocation, the allocation name
    regex and the families: the generated file is what the registry generates now, character for character."""
    assert names.TABLE_FILE.read_text() == names_generate.from_registry().source(), REGENERATE
    table = names.table()
    builtin = {n: c for n, c in h2o.policies.registered().items() if c.__module__.startswith("h2o.")}
    assert list(table.rules) == list(builtin), REGENERATE
    for name, cls in builtin.items():
        assert table.rules[name][:2] == (cls.GRAMMAR, cls.EXAMPLE) and cls.match(cls.EXAMPLE), name
    allocations = {n: c for n, c in allocation.registered_allocations().items() if c.__module__.startswith("h2o.")}
    assert table.allocations == {n: (c.grammar(n), c.example(n)) for n, c in allocations.items()}, REGENERATE
    assert list(table.families) == [f for f in h2o.policies.families() if f.partition("_")[0] in builtin
                                    or f == "recommended"], REGENERATE


def test_the_table_can_fail(monkeypatch):
    """A rule whose grammar changed without the table regenerated is caught."""
    monkeypatch.setattr(h2o.policies.TOVA, "GRAMMAR", "tova_<sinks>_<recent>_<budget>_<new>")
    assert names.TABLE_FILE.read_text() != names_generate.from_registry().source()


def test_the_module_check_says_whether_the_table_is_current(capsys):
    assert names_generate.main(["--check"]) == 0 and "current" in capsys.readouterr().out


EXAMPLES = ["retrieval_0.1_4+h2o_4_32_256_mean", "global+kvzip_4_32_256", "snapkv_4_32_256_16+tova",
            "snapkv_4_32_256_16+h2o_sum", "kvzip_4_32_256+h2o_mean", "recommended_256", "adakv_0.5+a2sf_4_32_256_0.9",
            "headkv_0.2_4+vlen_4_32_256_sum", "pyramid+streaming_4_252", "h2o_0_0_1", "streaming_0_1"]


def test_every_example_is_accepted_by_both(live):
    rules = [cls.EXAMPLE for cls in h2o.policies.registered().values()]
    allocated = [f"{live.allocations[n][1]}+h2o_4_32_256" for n in live.allocations] + \
                [f"{n}+tova_4_32_256" for n in live.allocations]
    for name in rules + allocated + EXAMPLES:
        assert registry_refusal(h2o.parse, name) is None, name
        assert names.policy_error(name, live) is None, name
        if names.split(name) or name.partition("_")[0] in names.table().rules or name.startswith("recommended_"):
            assert names.policy_error(name) is None, name  # a built-in name, by the generated table
    for family in live.families:
        for name in (family, f"adakv+{family}", f"retrieval_0.2_4+{family}"):
            if family == "recommended" and "+" in name:
                continue  # recommended holds its own allocation
            assert registry_refusal(h2o.policies.at_budget, name, 256) is None, name
            assert names.is_family(name, live) and names.family_error(name, live) is None, name
            assert names.family_error(name) is None, name


MALFORMED = ["streeming_4_60", "h2o_4_32_-5", "h2o_4_32", "lru_256", "", "kvzp_4_32_256", "recomended_256",
             "retreival_0.1_4+h2o_4_32_256", "adakb+h2o_4_32_256", "h2o_4_300_256", "streaming_0_0", "tova_4_32_0",
             "adakv+h2o_4_300_256", "adakv_1.2.3+h2o_4_32_256", "snapkv_256", "streaming_4_-1", "adakv+nonsense_1_2_3",
             "H2O_4_32_256", "h2o_4_32_256 ", "snapkv_40_300_256_16+tova", "kvzip_4_32_0+tova", "a2sf_4_32_256",
             "a2sf_300_0_256_0.5", "recommended", "adakv", "full_4", "halfs_2+h2o_4_32_256", "h2o 4 32 256"]
SUGGESTED = {"streeming_4_60": "did you mean 'streaming_<sinks>_<window>' (e.g. 'streaming_4_252')?",
             "kvzp_4_32_256": "did you mean 'kvzip_<sinks>_<recent>_<budget>[+<rule>]'",
             "recomended_256": "did you mean 'recommended_<budget>'",
             "retreival_0.1_4+h2o_4_32_256": "did you mean 'retrieval_0.1_4+h2o_4_32_256'?",
             "adakb+h2o_4_32_256": "did you mean 'adakv+h2o_4_32_256'?",
             "h2o_4_32_-5": "h2o names are h2o_<sinks>_<recent>_<budget>[_mean|_sum] (e.g. 'h2o_4_32_256')",
             "h2o_4_300_256": "sinks + recent (4 + 300) exceeds the budget 256",
             "streaming_0_0": "budget must be > 0 (got 0)",
             "adakv_1.2.3+h2o_4_32_256": "bad allocation 'adakv_1.2.3': its parameters must be numbers"}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_name_is_refused_by_both_in_the_same_words(name, live):
    said = registry_refusal(h2o.parse, name)
    assert said is not None, name
    assert names.policy_error(name, live) == said
    assert SUGGESTED.get(name, "") in said
    if live == names.table():  # a fresh registry (no user allocation): the generated table says the same
        assert names.policy_error(name) == said


BAD_FAMILIES = ["nope", "h2o_meen", "streeming", "adakb+h2o_mean", "adakv+h2o_meen", "adakv_1.2.3+h2o_mean",
                "adakv_x+h2o_mean", "h2o_4_32_256", "recommended_256", "H2O", "vatp_max", "retreival+tova"]


@pytest.mark.parametrize("name", BAD_FAMILIES)
def test_a_bad_family_is_refused_by_both_in_the_same_words(name, live):
    said = registry_refusal(h2o.policies.at_budget, name, 256)
    assert said is not None, name
    assert names.family_error(name, live) == said
    assert names.is_family(name, live) == h2o.policies.is_family(name)
    if live == names.table():
        assert names.family_error(name) == said


@pytest.mark.parametrize("name, said", [("h2o_meen", "did you mean 'h2o_mean' or 'h2o_sum'?"),
                                        ("streeming", "did you mean 'streaming'?"),
                                        ("adakb+h2o_mean", "did you mean 'adakv+h2o_mean'?"),
                                        ("adakv_0.5+h2o_meen", "did you mean 'adakv_0.5+h2o_mean'")])
def test_a_misspelt_family_is_told_the_closest(name, said):
    assert said in names.family_error(name)


def drawn_names(n: int, seed: int = 0) -> list[str]:
    """Names drawn around every rule's example: sizes swapped for good, bad and odd ones, suffixes and allocations
    added (good and bad), so that both the registry's acceptances and its refusals are many."""
    draw = random.Random(seed)
    examples = [cls.EXAMPLE for cls in h2o.policies.registered().values()] + ["recommended_256"]
    sizes = ["0", "1", "4", "16", "32", "256", "300", "-1", "x", "", "0.5"]
    tails = ["", "", "", "_mean", "_sum", "_max", "+tova", "+h2o_mean", "+kvzip", "+nope", "_16", "_0.9"]
    heads = ["", "", "", "adakv+", "adakv_0.5+", "retrieval_0.1_4+", "adakb+", "adakv_1.2.3+", "pyramid_x+",
             "headkv_0.2_4_1+"]
    out = []
    for _ in range(n):
        words = draw.choice(examples).split("_")
        words = [draw.choice(sizes) if w[0].isdigit() and draw.random() < 0.6 else w for w in words]
        out.append(draw.choice(heads) + "_".join(words) + draw.choice(tails))
    return out


def test_the_check_never_refuses_what_the_registry_takes_and_refuses_in_its_words(live):
    """Over names drawn around every example: a name the registry takes, the check takes; a name the check refuses,
    the registry refuses in the same words. (The check may take a name the registry then refuses: a rule's or an
    allocation's own constraints are the registry's. So where the allocation of "<allocation>+<rule>" breaks its
    own (the number of its parameters, their ranges) and the rule is malformed too, the registry names the
    allocation's fault and the check the rule's.)"""
    checked = refused_early = 0
    for name in dict.fromkeys(drawn_names(3000)):
        said, early = registry_refusal(h2o.parse, name), names.policy_error(name, live)
        checked += 1
        if said is None:
            assert early is None, name
        elif early is not None:
            refused_early += 1
            parts = allocation.split(name)
            if not (parts and registry_refusal(allocation.parse_allocation, parts[0])):
                assert early == said, name
    assert refused_early > checked // 3  # the draw refuses many names early, not a few


def test_the_family_check_never_refuses_what_the_registry_takes(live):
    families = [*live.families, *(f"{a}+{f}" for a, f in itertools.product(["adakv", "adakb", "pyramid_20",
                                                                            "adakv_1.2.3"], live.families))]
    for name in families + [f + "x" for f in families] + [f[:-1] for f in families]:
        said, early = registry_refusal(h2o.policies.at_budget, name, 256), names.family_error(name, live)
        if said is None:
            assert early is None, name
        elif early is not None and "+recommended" not in name:
            assert early == said, name
