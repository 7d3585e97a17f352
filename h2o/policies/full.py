"""The full cache: keep everything (the baseline every figure is compared with)."""

from __future__ import annotations

from dataclasses import dataclass

from . import register_policy
from .base import Policy


@register_policy
@dataclass(frozen=True)
class Full(Policy):
    NAME = "full"
    GRAMMAR = "full"
    EXAMPLE = "full"
    PATTERN = ""
    evicts = False

    @classmethod
    def from_name(cls, name, score=None):
        return cls() if cls.match(name) else None

    @classmethod
    def sized(cls, sinks, recent, budget):
        return cls()

    @property
    def name(self) -> str:
        return "full"

    @property
    def budget(self) -> None:
        return None
