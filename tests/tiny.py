"""Tiny random-weight models of each supported family, for the equivalence oracles."""

import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

VOCAB = 97
SLIDING_WINDOW = 12  # the tiny Gemmas' window: short, so the oracles' prompts run past it
# the tiny model's attention logits reach ~13 (initializer_range 0.2): a cap of 8 bends the peaks (tanh far from
# linear) and keeps them peaks, so scores still tell tokens apart
GEMMA2_SOFTCAP = 8.0


def _hybrid(layers: int) -> list[str]:
    """Gemma's pattern on a few layers: sliding-window layers, every third layer (and the last) full attention."""
    return ["full_attention" if i % 3 == 2 or i == layers - 1 else "sliding_attention" for i in range(layers)]


def tiny_model(family: str, attn: str = "sdpa", layers: int | None = None, seed: int = 0):
    """layers: 2 by default; 4 for the hybrid Gemmas (2 sliding-window layers, then 2 compressed full-attention
    ones, so that head and layer budgets have several compressed layers to split over)."""
    if layers is None:
        layers = 4 if family.startswith("gemma") else 2
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=256,
                  initializer_range=0.2)  # peaky attention, so heads disagree on heavy hitters
    gqa = dict(num_key_value_heads=2)
    if family == "gpt_neox":
        config, cls = GPTNeoXConfig(**common, rotary_pct=0.25), GPTNeoXForCausalLM
    elif family == "llama":
        config, cls = LlamaConfig(**common, **gqa), LlamaForCausalLM
    elif family == "mistral":
        config, cls = MistralConfig(**common, **gqa, sliding_window=None), MistralForCausalLM
    elif family == "qwen2":
        config, cls = Qwen2Config(**common, **gqa, use_sliding_window=False), Qwen2ForCausalLM
    elif family == "qwen3":
        config, cls = Qwen3Config(**common, **gqa, head_dim=16, use_sliding_window=False), Qwen3ForCausalLM
    elif family == "gemma3":  # hybrid: sliding-window layers around full ones, QK-norm, two RoPE bases
        config, cls = Gemma3TextConfig(**common, **gqa, head_dim=16, sliding_window=SLIDING_WINDOW,
                                       layer_types=_hybrid(layers), query_pre_attn_scalar=16), Gemma3ForCausalLM
    elif family == "gemma2":  # hybrid, with soft-capped attention logits
        config, cls = Gemma2Config(**common, **gqa, head_dim=16, sliding_window=SLIDING_WINDOW,
                                   layer_types=_hybrid(layers), query_pre_attn_scalar=16,
                                   attn_logit_softcapping=GEMMA2_SOFTCAP, final_logit_softcapping=30.0), Gemma2ForCausalLM
    else:
        raise ValueError(family)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.set_attn_implementation(attn) if hasattr(model, "set_attn_implementation") else None
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def token_ids(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


class TinyTokenizer:
    """A stand-in tokenizer for the tiny models (what a replaying rule's prompts need): text -> its UTF-8 bytes, as
    ids modulo the vocabulary; no chat template."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b % VOCAB for b in text.encode()]


TOKENIZER = TinyTokenizer()


def random_surrogate(layers: int, heads: int, head_dim: int, rotary_dims: int, seed: int = 0):
    """A surrogate of KVzip's scores (`h2o.Surrogate`) with random predictors, for a kvzap rule on random weights:
    the rule's mechanics (binding, scoring, eviction) without a fit."""
    from h2o.score_surrogate import HIDDEN, Surrogate

    g = torch.Generator().manual_seed(seed)
    f = rotary_dims // 2 + (head_dim - rotary_dims) + head_dim
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return Surrogate(rotary_dims, head_dim, {
        "mean": r(layers, heads, f), "std": r(layers, heads, f).abs() + 0.5, "linear": r(layers, heads, f + 1),
        "w1": r(layers, heads, f, HIDDEN), "b1": r(layers, heads, HIDDEN), "w2": r(layers, heads, HIDDEN),
        "b2": r(layers, heads)})


def surrogate_for(model, seed: int = 0):
    """A random surrogate of `model`'s shape (its compressed layers, KV heads, head and rotary dims)."""
    from h2o.models import compressed_layers, head_dim, kv_heads, rotary_dims

    config = model.config
    return random_surrogate(len(compressed_layers(config)), kv_heads(config), head_dim(config), rotary_dims(config), seed)


def surrogate_kw(model, policy) -> dict:
    """{"surrogate": a random one of the model's shape} for a rule that ranks by one (kvzap, alone or under an
    allocation), else {}: what a test that runs every registered rule passes to h2o.make_cache."""
    import h2o

    parsed = h2o.parse(policy)
    needs = getattr(getattr(parsed, "rule", parsed), "needs_surrogate", False)
    return {"surrogate": surrogate_for(model)} if needs else {}
