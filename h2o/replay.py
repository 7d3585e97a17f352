"""Context reconstruction (KVzip): after a forward of several tokens, replay them so that a rule can score each key.

`h2o.make_cache(model, "kvzip_...", tokenizer=tok)` installs two hooks on the base model. Before a forward of several
tokens the cache holds its layers (no eviction); after it, `Replay.run` feeds the base model, per chunk of at most
`chunk` of those tokens, an instruction to repeat the context, the start of the assistant's turn (the tokenizer's
chat template; a newline without one) and the chunk itself, teacher-forced, over the cache: each layer's attention
scores the chunk's keys (`h2o.attention.replay_attention`) and drops the replay's own keys and values, so a replay
holds at most one chunk + its instruction beyond the context, and memory stays bounded. Then the cache releases its
layers, which evict by the scores. In the streaming protocol every fed chunk is replayed before it can be evicted;
a chunk after the first is asked for as "the part of the previous context ... starting with" the previous one's last
`overlap` tokens (the paper's and kvpress's prompts).

Rows without padding (a batch of equal-length prompts; kvpress's KVzipPress takes one row); input ids, not
embeddings: anything else is refused before the forward runs.
"""

from __future__ import annotations

import torch

FIRST = "\n\nRepeat the previous context exactly."
NEXT = "\n\nRepeat the part of the previous context exactly, starting with"
CHUNK = 512
OVERLAP = 8


def _ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return list(ids.flatten().tolist() if isinstance(ids, torch.Tensor) else ids)


def assistant_start(tokenizer) -> str:
    """The text between a user's message and the assistant's answer in the tokenizer's chat template ("\\n" without
    one)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "\n"
    marker = "\n" + "#" * 13
    text = tokenizer.apply_chat_template([{"role": "user", "content": "dummy context" + marker}],
                                         add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str) or marker not in text:
        raise ValueError("a replaying rule (KVzip) puts its replay prompt in the user's turn of the tokenizer's chat "
                         "template, but this template does not reproduce the user's text (it rewrites or drops it), "
                         "so the assistant's turn cannot be found. Pass a tokenizer whose template keeps the "
                         "message, or set tokenizer.chat_template = None (the replay then uses a newline)")
    return text.split(marker, 1)[1]


class Replay:
    """The replay prompts of one tokenizer, and the replay of a cache's newest tokens."""

    def __init__(self, tokenizer, chunk: int = CHUNK, overlap: int = OVERLAP):
        if isinstance(tokenizer, (str, bytes)) or not hasattr(tokenizer, "encode"):
            raise TypeError(f"a replaying rule (KVzip) needs the model's tokenizer object for its replay "
                            f"prompts, got {type(tokenizer).__name__} {tokenizer!r:.80}: pass "
                            "tokenizer=AutoTokenizer.from_pretrained(...) (the object, not its name)")
        if chunk < 1 or overlap < 0:
            raise ValueError(f"replay chunk must be >= 1 and overlap >= 0, got {chunk}, {overlap}")
        self.first, self.next = _ids(tokenizer, FIRST), _ids(tokenizer, NEXT)
        self.suffix = _ids(tokenizer, assistant_start(tokenizer))
        self.chunk, self.overlap = chunk, overlap

    def inputs(self, ids: torch.Tensor, previous: torch.Tensor | None) -> list[tuple[int, int, torch.Tensor]]:
        """Per chunk of `ids` [B, q] (the forward's tokens; `previous` [B, <= overlap]: the last tokens fed before
        them, or None): (start, stop) within the forward, and the replay's input ids [B, r]."""
        rows, device = ids.shape[0], ids.device
        def fixed(tokens):
            return torch.tensor(tokens, dtype=ids.dtype, device=device).expand(rows, -1)
        out = []
        for start in range(0, ids.shape[1], self.chunk):
            stop = min(ids.shape[1], start + self.chunk)
            before = ids[:, max(0, start - self.overlap):start] if start else previous
            if before is not None and before.shape[1] and self.overlap:
                ask = torch.cat([fixed(self.next), before[:, -self.overlap:].to(device)], dim=1)
            else:
                ask = fixed(self.first)
            out.append((start, stop, torch.cat([ask, fixed(self.suffix), ids[:, start:stop]], dim=1)))
        return out

    def longest(self, q: int) -> int:
        """The most tokens one replay forward of a q-token forward feeds (its instruction and one chunk)."""
        return max(len(self.first), len(self.next) + self.overlap) + len(self.suffix) + min(q, self.chunk)

    def run(self, base_model, cache, ids: torch.Tensor, previous: torch.Tensor | None) -> None:
        """Replay the forward's tokens `ids` [B, q] (the last q the cache saw), chunk by chunk; then release. A replay
        that raises, or is interrupted, leaves the cache marked: its next forward says so (reset() it)."""
        first = cache.seen_tokens() - ids.shape[1]  # arrival index of the forward's first token
        try:
            with torch.no_grad():
                for start, stop, replay in self.inputs(ids, previous):
                    cache.replay_window((first + start, first + stop))
                    windows = cache.window_state()  # the sliding-window layers, as before the replay
                    try:
                        base_model(input_ids=replay, past_key_values=cache, use_cache=True)
                    finally:
                        cache.restore_windows(windows)
        except BaseException as error:
            cache.interrupted = (f"{cache.policy.name}: the replay that scores a forward's tokens did not finish "
                                 f"({type(error).__name__}), so this cache holds tokens it could not score or evict. "
                                 "reset() the cache (or make a new one with h2o.make_cache) before the next prompt")
            raise
        finally:
            cache.replay_window(None)
        cache.release()
