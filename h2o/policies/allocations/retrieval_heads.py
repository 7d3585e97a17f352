"""Retrieval, induction, ablation and reconstruction heads (RazorAttention / DuoAttention without training):
`retrieval_<share>_<factor>`, `induction_…`, `ablation_…`, `reconstruction_…`. The top <share> of the model's KV heads
by a head score (`h2o.head_scores`) hold up to <factor> x budget tokens; every other head holds
floor((N x budget - n x cap) / (N - n)).

`reconstruction_<share>_<factor>+<rule>` is KVzip's context-independent variant, DuoAttention-style: the heads that
the model reads all over the context when it reconstructs calibration text keep the whole context (up to <factor> x
budget: <factor> = 1 / the budget's share of the prompt gives them all of it), the others the rule's share of what
is left (with `streaming_…`: sinks and a window, DuoAttention's streaming heads). No replay at run time: the head
scores are computed once per model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import Policy
from .plan import Allocation, LayerPlan, head_tables, register_allocation

@register_allocation
@dataclass(frozen=True)
class HeadShare(Allocation):
    """The top `share` of KV heads by head score `score` hold up to `factor` x budget; the rest share what is left."""

    NAME = "retrieval"
    NAMES = ("retrieval", "induction", "ablation", "reconstruction")
    GRAMMAR, EXAMPLE = "{name}_<share>_<factor>", "{name}_0.1_4"
    HELP = ("the top <share> of KV heads by the {name} head score hold up to <factor> x budget, every other head an "
            "equal share of the rest")
    score_name: str = "retrieval"
    share: float = 0.1
    factor: float = 4.0

    def __post_init__(self):
        if not 0 < self.share < 1:
            raise ValueError(f"{self.score_name}_<share>_<factor>: share must lie in (0, 1), got {self.share}")
        if not self.factor > 1:
            raise ValueError(f"{self.score_name}_<share>_<factor>: factor must be > 1, got {self.factor}")

    @classmethod
    def from_args(cls, name, values, text):
        if values and len(values) != 2:
            raise ValueError(f"{text!r}: write {name}_<share>_<factor>, e.g. {name}_0.1_4")
        return cls(name, *values)

    @property
    def score(self) -> str:
        return self.score_name

    @property
    def name(self) -> str:
        return f"{self.score_name}_{self.share:g}_{self.factor:g}"

    def sizes(self, rule: Policy, n_heads: int) -> tuple[int, int, int]:
        """(retrieval heads, their cap, every other head's budget) for a model of `n_heads` KV heads in all."""
        budget = rule.budget
        n = max(1, round(self.share * n_heads))
        if n >= n_heads:
            raise ValueError(f"{self.name}+{rule.name}: a share of {self.share:g} of this model's {n_heads} KV heads rounds "
                             f"to {n}, every head, leaving none to hold less: lower the share")
        cap = int(self.factor * budget)
        rest = (n_heads * budget - n * cap) // (n_heads - n)
        if rest <= rule.sinks:
            raise ValueError(f"{self.name}+{rule.name}: {n} of {n_heads} heads at {cap} tokens leave {rest} tokens to "
                             f"each other head, not more than its {rule.sinks} sinks: lower the share or the factor, "
                             "or raise the budget")
        return n, cap, rest

    def plan(self, rule, layers, heads, scores=None):
        if scores is None:
            raise ValueError(f"{self.name}: needs head scores ('{self.score_name}'): pass "
                             "head_scores=h2o.head_scores(model, ...) to h2o.make_cache")
        tables = head_tables(scores)
        if self.score_name not in tables:
            raise ValueError(f"{self.name}: ranks heads by the '{self.score_name}' score, and the head scores given have "
                             f"only {', '.join(sorted(tables)) or 'none'} (a model without a tokenizer has no retrieval "
                             "score: use induction_<share>_<factor>; reconstruction needs one too)")
        table = tables[self.score_name]
        if tuple(table.shape) != (layers, heads):
            raise ValueError(f"{self.name}: head scores of shape {tuple(table.shape)} do not fit this model "
                             f"({layers} layers x {heads} KV heads)")
        n, cap, rest = self.sizes(rule, layers * heads)
        order = torch.argsort(table.flatten().to(torch.float64), descending=True, stable=True)
        chosen = {divmod(int(i), heads) for i in order[:n]}
        out = []
        for layer in range(layers):
            top = tuple(h for h in range(heads) if (layer, h) in chosen)
            other = tuple(h for h in range(heads) if (layer, h) not in chosen)
            out.append(LayerPlan(tuple(g for g in ((top, cap), (other, rest)) if g[0])))
        return out
