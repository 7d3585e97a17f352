"""The README's user policy, run exactly as printed: registered from outside the package, it parses by name,
runs with generate and keeps its bound; a second registration of the same name is refused."""

import re
from pathlib import Path

import pytest
import torch

import h2o
from h2o import policies
from tiny import tiny_model, token_ids

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def registry():
    """Restore the registry afterwards: the example must not leak into other tests' 'every registered rule'."""
    saved = dict(policies._REGISTRY)
    yield
    policies._REGISTRY.clear()
    policies._REGISTRY.update(saved)


def readme_example() -> str:
    text = README.read_text()
    block = re.search(r"<!-- user-policy-example -->\n```python\n(.*?)```\n<!-- /user-policy-example -->", text, re.S)
    assert block, "the README lost its user-policy example"
    return block[1]


def test_the_readme_policy_registers_and_runs(registry):
    namespace = {"__name__": "user_code"}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    cls = namespace["PeakAttention"]
    assert h2o.parse("peak_2_2_12") == cls(2, 2, 12)
    assert h2o.policy_names()["peak_<sinks>_<recent>_<budget>"] == "peak_4_32_256"
    model = tiny_model("llama")
    cache = h2o.make_cache(model, "peak_2_2_12", buffer=0)
    out = model.generate(token_ids(20), past_key_values=cache, max_new_tokens=8, do_sample=False)
    h2o.restore(model)
    assert out.shape[1] == 28 and cache.kept_lengths() == [12, 12]
    peak = cache.layers[0].state["peak"]
    assert peak.dtype == torch.float32 and peak.shape == (1, 2, 12) and (peak[..., :-1] > 0).all()
    with pytest.raises(ValueError, match="already registered"):
        h2o.register_policy(cls)


def test_bad_registrations_are_refused(registry):
    with pytest.raises(TypeError, match="subclass of h2o.Policy"):
        h2o.register_policy(int)

    class NoGrammar(h2o.Policy):
        NAME = "nogrammar"
    with pytest.raises(TypeError, match="GRAMMAR"):
        h2o.register_policy(NoGrammar)

    class Pyramid(h2o.Policy):  # an allocation's name
        NAME, GRAMMAR, EXAMPLE = "pyramid", "pyramid", "pyramid"
    with pytest.raises(ValueError, match="the name of an allocation"):
        h2o.register_policy(Pyramid)

    class Sees(h2o.Policy):
        NAME, GRAMMAR, EXAMPLE = "sees", "sees", "sees"
        observes = frozenset({"gradient"})
    with pytest.raises(ValueError, match="what attention can give"):
        h2o.register_policy(Sees)


def test_unknown_names_list_every_registered_rule_and_a_misspelling_is_told_the_users_own(registry):
    """An unknown name lists every registered rule by name, the user's among them (the grammars: h2o.policy_names(),
    each example parsing back); a misspelt user rule gets "did you mean" its grammar."""
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "user_code"})
    with pytest.raises(ValueError) as err:
        h2o.parse("lru_256")
    for cls in h2o.policies.registered().values():
        assert f" {cls.NAME}," in str(err.value) or f" {cls.NAME} (" in str(err.value), cls.NAME
    for grammar, example in h2o.policy_names().items():
        assert h2o.parse(example).name == h2o.parse(h2o.parse(example).name).name
    with pytest.raises(ValueError, match="did you mean 'peak_<sinks>_<recent>_<budget>' \\(e.g. 'peak_4_32_256'\\)"):
        h2o.parse("peek_4_32_256")
