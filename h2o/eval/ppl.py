"""Perplexity with the policy's eviction really in force.

`token_losses` feeds a document through the model with a compressed cache, `chunk` tokens per
forward, exactly as generation would feed it: chunk=1 is StreamingLLM's `eval_long_ppl`
protocol (token by token, eviction after every step); chunk=C>1 is the faster chunked mode
(each forward scores C tokens over the compressed cache, then the cache is cut back), labelled
as such wherever it is reported. The full-cache baseline runs through the same loop, so it
always keeps the whole context.

Guards (raise `ValidityError`): every layer's cache stays within its policy's bound after each
forward; once the text outgrows the budget, a compressed policy's losses must differ from the
full cache's (identical losses mean no eviction was in force); with original positions, a run
past the model's trained context is reported (`past_trained_context`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .runners import ValidityError, open_runner


@dataclass
class PPLResult:
    policy: str
    mode: str  # "stream" (token by token) or "chunked-<C>"
    losses: torch.Tensor  # [B, N-1] float32 NLL of tokens 1..N-1
    first_eviction: int | None  # index into `losses` of the first token scored after an eviction
    max_kept: int  # largest cache length seen after any forward
    past_trained_context: bool
    max_kv_bytes: int = 0  # most bytes the cache held after any forward (every head's buffers, bookkeeping included)
    notes: list[str] = field(default_factory=list)

    def ppl(self, row: int | None = None, after_eviction: bool = False, start: int = 0) -> float:
        """PPL over all scored tokens from loss index `start` on (or from this run's first eviction)."""
        losses = self.losses if row is None else self.losses[row : row + 1]
        if after_eviction:
            if self.first_eviction is None:
                return math.nan
            start = self.first_eviction
        return math.exp(losses[:, start:].double().mean().item())


def trained_context(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def token_losses(model, ids: torch.Tensor, policy: str, *, chunk: int = 1, prefill: int | None = None,
                 positions: str = "original", buffer: int = 64, progress: bool = True, desc: str | None = None) -> PPLResult:
    """Per-token NLL of `ids` [B, N] under `policy`, `prefill` tokens first, then `chunk` at a time."""
    batch, n = ids.shape
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    prefill = chunk if prefill is None else prefill
    if not 1 <= prefill < n:
        raise ValueError(f"prefill must be in [1, {n - 1}], got {prefill}")
    runner = open_runner(model, policy, positions=positions, buffer=buffer)
    device = next(model.parameters()).device
    ids = ids.to(device)
    losses, first_eviction, max_kept, max_kv = [], None, 0, 0
    starts = list(range(prefill, n, chunk))
    bar = tqdm(total=n, desc=desc or policy, disable=not progress, unit="tok", leave=False)
    with torch.no_grad():
        for start, stop in zip([0] + starts, starts + [n]):
            logits = runner.forward(ids[:, start:stop])
            losses.append(next_token_losses(logits, ids, start, stop))
            kept = runner.check()
            max_kept, max_kv = max(max_kept, kept), max(max_kv, runner.kv_bytes())
            if first_eviction is None and runner.compressed():
                first_eviction = stop  # logits at position `stop` (loss index `stop`) are the first computed after it
            bar.update(stop - start)
    bar.close()
    runner.close()
    losses = torch.cat(losses, dim=1)
    context = trained_context(model)
    past = positions == "original" and context is not None and n > context
    result = PPLResult(policy=runner.name, mode="stream" if chunk == 1 else f"chunked-{chunk}",
                       losses=losses, first_eviction=first_eviction, max_kept=max_kept, past_trained_context=past,
                       max_kv_bytes=max_kv)
    if past:
        result.notes.append(f"{n} tokens with original positions pass the model's trained context of {context}")
    if runner.evicts and first_eviction is None:
        result.notes.append(f"the text ({n} tokens) never outgrew budget + buffer: no eviction happened")
    return result


def losses_unit(model, tokenizer, spec: dict) -> dict:
    """A unit of work (h2o.eval.units): one text (one row of ids) under one policy; the PPLResult as a dict."""
    import h2o

    ids = torch.tensor([spec["ids"]], dtype=torch.long)
    try:
        result = token_losses(model, ids, spec["policy"], chunk=spec["chunk"], prefill=spec["prefill"],
                              positions=spec["positions"], buffer=spec["buffer"], progress=False)
    finally:
        h2o.restore(model)
    out = {k: getattr(result, k) for k in ("policy", "mode", "first_eviction", "max_kept", "past_trained_context",
                                           "max_kv_bytes", "notes")}
    return {**out, "losses": result.losses[0].tolist()}


def text_unit(label: str, ids: torch.Tensor, policy: str, *, chunk: int, prefill: int, positions: str,
              buffer: int):
    """The unit of `policy`'s token losses on one text (`ids` [1, N] or [N])."""
    from .units import Unit

    return Unit("losses", f"{label}:{policy}", {"ids": ids.reshape(-1).tolist(), "policy": policy, "chunk": chunk,
                                               "prefill": prefill, "positions": positions, "buffer": buffer})


def from_unit(result: dict) -> PPLResult:
    """The PPLResult a losses unit computed (losses [1, N-1], float32 as computed)."""
    fields = {k: v for k, v in result.items() if k != "losses"}
    return PPLResult(losses=torch.tensor([result["losses"]], dtype=torch.float32), **fields)


def text_losses(run_units, texts: dict[str, torch.Tensor], policies: list[str], desc: str, **kw) -> dict:
    """{(text label, policy): PPLResult} of every policy on every text, each pair a unit (`run_units`: a
    Session's, in this process or on Ray)."""
    work = {(label, p): text_unit(label, ids, p, **kw) for p in policies for label, ids in texts.items()}
    results = run_units(list(work.values()), desc=desc)
    return {pair: from_unit(results[unit.key]) for pair, unit in work.items()}


def next_token_losses(logits: torch.Tensor, ids: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """NLL [B, n] (on CPU) of each next token that exists, from the logits of ids[:, start:stop]."""
    targets = ids[:, start + 1 : stop + 1]
    nll = F.cross_entropy(logits[:, : targets.shape[1]].float().transpose(1, 2), targets, reduction="none")
    return nll.cpu()


def check_bound(cache, bound: int | None, policy: str) -> int:
    """The longest layer's kept length; a `ValidityError` if any KV head holds more than its own bound (its budget +
    buffer: under head and layer budgets each head's own, which may exceed the uniform rule's), or, for a cache that
    reports no head bounds, if a layer holds more than `bound`."""
    kept = max(cache.kept_lengths())
    if bound is None:
        return kept
    if hasattr(cache, "head_bounds"):
        for layer, (lengths, bounds) in enumerate(zip(cache.head_lengths(), cache.head_bounds())):
            for head, (n, most) in enumerate(zip(lengths, bounds)):
                if most is not None and n > most:
                    raise ValidityError(f"{policy}: compressed layer {layer} KV head {head} holds {n} tokens, above "
                                        f"its budget + buffer = {most}")
    elif kept > bound:
        raise ValidityError(f"{policy}: a layer holds {kept} tokens, above budget + buffer = {bound}")
    return kept


def check_eviction_in_force(full: PPLResult, compressed: PPLResult) -> None:
    """A compressed run whose losses equal the full cache's after its first eviction measured nothing."""
    if compressed.first_eviction is None:
        return
    a, b = full.losses[:, compressed.first_eviction :], compressed.losses[:, compressed.first_eviction :]
    if a.shape == b.shape and torch.equal(a, b):
        raise ValidityError(
            f"{compressed.policy}: token losses after the first eviction are identical to the full cache's; "
            "eviction was not in force"
        )
