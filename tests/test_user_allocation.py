"""An allocation of your own, registered from outside the package as a rule is (`h2o.register_allocation`): it parses
by name in every entry point, is refused where it is malformed, runs in a cache, and the property tests of the built-in
allocations run on it (the memory-held property draws every registered allocation; here, every feeding mode)."""

from dataclasses import dataclass

import pytest

import h2o
from h2o.policies.allocation import LayerPlan, allocation_names, registered_allocations
from test_memory_held import MODES, feed, formable, model_for
from tiny import TOKENIZER


@h2o.register_allocation
@dataclass(frozen=True)
class Halves(h2o.Allocation):
    """The first half of every layer's KV heads hold <ratio> times what the other half holds (mean: the budget)."""

    NAME, GRAMMAR, EXAMPLE = "halves", "halves_<ratio>", "halves_3"
    HELP = "the first half of each layer's KV heads hold <ratio> times what the other half holds"
    ratio: float = 3.0

    def __post_init__(self):
        if not self.ratio >= 1:
            raise ValueError(f"halves_<ratio>: ratio must be >= 1, got {self.ratio}")

    @property
    def name(self) -> str:
        return f"halves_{self.ratio:g}"

    def plan(self, rule, layers, heads, scores=None):
        half = heads // 2
        if half == 0:
            return [LayerPlan(((tuple(range(heads)), rule.budget),)) for _ in range(layers)]
        low = max(rule.sinks + rule.recent, int(2 * rule.budget / (1 + self.ratio)))
        high = (heads * rule.budget - (heads - half) * low) // half
        return [LayerPlan(((tuple(range(half)), high), (tuple(range(half, heads)), low))) for _ in range(layers)]


def test_a_registered_allocation_parses_by_name_and_is_listed():
    assert registered_allocations()["halves"] is Halves
    assert allocation_names()["halves"] == ("halves_<ratio>", "halves_3")
    policy = h2o.parse("halves_2+h2o_4_32_256")
    assert isinstance(policy.allocation, Halves) and policy.allocation.ratio == 2 and policy.name == \
        "halves_2+h2o_4_32_256_mean"
    assert h2o.parse("halves+tova_4_32_256").allocation == Halves()
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        h2o.parse("halves_0.5+h2o_4_32_256")
    with pytest.raises(ValueError, match="'halves_1_2': write halves_<ratio>, e.g. halves_3"):
        h2o.parse("halves_1_2+h2o_4_32_256")
    with pytest.raises(ValueError, match="did you mean 'halves_2\\+h2o_4_32_256'"):
        h2o.parse("halfs_2+h2o_4_32_256")


def test_registering_an_allocation_is_checked():
    with pytest.raises(ValueError, match="already registered"):
        h2o.register_allocation(type("Again", (Halves,), {}))
    with pytest.raises(ValueError, match="already registered"):  # a rule's name
        h2o.register_allocation(type("Rule", (Halves,), {"NAME": "h2o", "EXAMPLE": "h2o_3"}))
    with pytest.raises(TypeError, match="HELP"):
        h2o.register_allocation(type("NoHelp", (Halves,), {"NAME": "nohelp", "HELP": "", "EXAMPLE": "nohelp_3"}))
    with pytest.raises(ValueError, match="does not parse back"):
        h2o.register_allocation(type("Bad", (Halves,), {"NAME": "bad", "EXAMPLE": "bad_1_2_3"}))
    with pytest.raises(TypeError, match="subclass"):
        h2o.register_allocation(int)
    assert "nohelp" not in registered_allocations() and "bad" not in registered_allocations()


@pytest.mark.parametrize("mode", MODES)
def test_a_registered_allocation_holds_the_memory_property_in_every_feeding_mode(mode):
    """The checks of the built-in allocations' property (tests/test_memory_held.py: `feed` checks after every
    forward that the storages stay within the uniform rule's bound, every storage reachable is counted, the kept
    tokens are readable), for three rules, one of them replaying."""
    model = model_for(mode)
    replaying = [] if mode == "left-padded batch" else ["kvzip_2_4_12"]  # KVzip refuses padded rows (tested there)
    for rule in ["h2o_2_4_12", "streaming_2_10", *replaying]:
        name = f"halves+{rule}"
        assert formable(model, name)
        cache = h2o.make_cache(model, name, buffer=2, tokenizer=TOKENIZER)
        try:
            feed(model, cache, mode, 30, [9, 7, 14], 2, 2)
            assert cache.evicted()
        finally:
            h2o.restore(model)


def test_the_readmes_allocation_table_is_the_registrys():
    """The README lists every built-in allocation as the registry describes it (generated, never hand-edited)."""
    from pathlib import Path

    from h2o.policies.allocation import allocation_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("<!-- allocations:")
    block = readme[readme.index("\n", start) + 1:readme.index("<!-- /allocations -->")]
    assert block == allocation_table()
    assert "halves" not in block and "halves" in allocation_table(builtin_only=False)
