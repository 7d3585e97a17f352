"""Issue 38: never more memory than the cache says, never silently wrong.

`kv_bytes()` is the bytes of the storages the cache keeps alive, measured from the tensors it holds (each storage once,
whole: a view keeps its buffer alive). The property below holds every registered rule x every allocation x every way
of feeding a cache (one forward, chunks, token by token, a left-padded batch, beams, KVzip's replays, a hybrid model)
to the uniform rule's bound after every forward, and checks that no storage is reachable from the cache that
`kv_bytes()` does not count. The tests after it each guard one defect the issue found."""

import gc
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import h2o
from h2o.cache import reachable_storages
from h2o.compressed_layer import UnobservedError
from h2o.head_group_layer import HeadGroupLayer
from h2o.models import compressed_layers, layer_windows
from tiny import TOKENIZER, tiny_model, token_ids, surrogate_kw

BUDGET = 12
SLOT_BYTES = 2 * 16 * 4  # a float32 key and value of 16 dims (every tiny model's head dim)
KV_HEADS = 2
RULES = [cls.sized(2, 4, BUDGET).name for cls in h2o.policies.registered().values() if cls.evicts]
# sized for the tiny models' 2 KV heads; every registered allocation is drawn too (bare: its defaults), a user's
# included (registered from outside the package before the tests run: tests/test_user_allocation.py)
SIZED = ["adakv_0.5", "retrieval_0.3_2", "induction_0.3_2", "ablation_0.3_2", "pyramid_4", "global_0.5", "headkv_0.5"]


def allocations() -> list[str | None]:
    return [None, *h2o.policies.allocation.registered_allocations(), *SIZED]
MODES = ["one forward", "chunks", "token by token", "left-padded batch", "beams", "hybrid"]
_MODELS: dict = {}


def model_for(mode: str):
    family = "gemma3" if mode == "hybrid" else "llama"
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family, "eager" if family == "gemma3" else "sdpa")
    return _MODELS[family]


def head_scores_for(model):
    shape = (len(compressed_layers(model.config)), KV_HEADS)
    g = torch.Generator().manual_seed(0)
    return {name: torch.rand(shape, generator=g) for name in ("retrieval", "induction", "ablation", "reconstruction")}


def policy_name(rule: str, allocation: str | None) -> str:
    return rule if allocation is None else f"{allocation}+{rule}"


def formable(model, name: str) -> bool:
    """Whether the allocation can be formed at all on this model's heads (else make_cache refuses it before any
    work: tested in test_allocation); every other combination must run."""
    try:
        h2o.make_cache(model, name, **surrogate_kw(model, name), buffer=2, head_scores=head_scores_for(model), tokenizer=TOKENIZER)
        return True
    except ValueError as error:
        assert "leave" in str(error) or "budget" in str(error), error
        return False
    finally:
        h2o.restore(model)


def uniform_ceiling(model, rows: int, buffer: int, reserve: int) -> int:
    """The most key/value bytes the uniform rule may hold after a forward: per row, compressed layer and KV head,
    budget + buffer + a reserve for the largest chunk fed so far (a forward of at most budget + buffer tokens; 1
    for a longer one); per sliding-window layer, its window (window - 1 kept, + one step's)."""
    windows = layer_windows(model.config)
    compressed = sum(w is None for w in windows)
    sliding = sum(w for w in windows if w is not None)
    return rows * KV_HEADS * SLOT_BYTES * (compressed * (BUDGET + buffer + reserve) + sliding)


def check_held(cache, model, rows: int, buffer: int, reserve: int) -> None:
    """After a forward: the key/value storages within the uniform rule's bound, nothing big held uncounted, and the
    kept tokens readable where the README says."""
    held = cache.kv_bytes(bookkeeping=False)
    ceiling = uniform_ceiling(model, rows, buffer, reserve)
    assert held <= ceiling, (cache.policy.name, held, ceiling, cache.head_lengths())
    counted = cache.kv_bytes()
    reachable = sum(reachable_storages(cache).values())
    assert reachable == counted, (cache.policy.name, reachable, counted)
    for layer, lengths in zip(cache.policy_layers(), cache.head_lengths()):
        if isinstance(layer, HeadGroupLayer):  # head-group layers: head_lengths(), each group's keys hold its tokens
            groups = [row for row in getattr(layer, "rows", [layer])]
            for group in groups:
                for (heads, _), sub in zip(group.plan.groups, group.sublayers):
                    assert sub.keys.shape[-2] == sub.length
            assert lengths == layer.head_lengths()
        elif layer.keys is not None:
            assert layer.keys.shape[-2] == lengths[0]  # exactly the kept tokens
    for layer, w in zip(cache.layers, cache.windows):
        if w is not None and layer.keys is not None:
            assert layer.keys.shape[-2] <= w - 1


def feed(model, cache, mode: str, n: int, chunks: list[int], buffer: int, batch: int):
    """Feed the cache as `mode` says, checking after every forward (a forward hook: after any replay)."""
    rows = {"left-padded batch": batch, "beams": 2}.get(mode, 1)
    reserve = [1]

    def after(module, args, kwargs, output):
        if cache.replaying:  # a replay's own forward, inside the forward it scores (where the model's base model is
            return           # the model itself, transformers 4.56's Gemma 3): no caller can look at the cache there
        check_held(cache, model, rows * (2 if mode == "beams" else 1), buffer, reserve[0])

    def forward(ids, mask=None):
        q = ids.shape[1]
        reserve[0] = max(reserve[0], q if q <= BUDGET + buffer else 1)
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)

    hook = model.register_forward_hook(after, with_kwargs=True)
    try:
        with torch.no_grad():
            if mode == "one forward":
                ids = token_ids(n + 3, seed=n)
                forward(ids[:, :n])
                for t in range(n, n + 3):
                    forward(ids[:, t:t + 1])
            elif mode in ("chunks", "hybrid"):
                ids = token_ids(sum(chunks) + 2, seed=n)
                start = 0
                for size in chunks + [1, 1]:
                    forward(ids[:, start:start + size])
                    start += size
            elif mode == "token by token":
                ids = token_ids(n, seed=n)
                for t in range(n):
                    forward(ids[:, t:t + 1])
            elif mode == "left-padded batch":
                ids = token_ids(n + 2, batch=batch, seed=n)
                mask = torch.ones_like(ids)
                mask[0, :min(5, n - 1)] = 0
                forward(ids[:, :n], mask[:, :n])
                for t in range(n, n + 2):
                    forward(ids[:, t:t + 1], mask[:, :t + 1])
            else:  # beams: generate's prompt forward and steps over 2 beams
                ids = token_ids(n, seed=n)
                reserve[0] = max(reserve[0], n if n <= BUDGET + buffer else 1)
                model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=4,
                               num_beams=2, do_sample=False)
    finally:
        hook.remove()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", RULES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(allocation=st.deferred(lambda: st.sampled_from(allocations())), n=st.integers(8, 48),
       chunks=st.lists(st.integers(1, 24), min_size=1, max_size=4), buffer=st.integers(0, 4), batch=st.integers(2, 3))
def test_storages_held_stay_within_the_uniform_rules_bound_for_every_rule_allocation_and_feeding(
        rule, mode, allocation, n, chunks, buffer, batch):
    """Every registered rule in every feeding mode (KVzip's replays: the kvzip rule in each), each drawing allocations
    (none, or one of them) and sizes."""
    model = model_for(mode)
    name = policy_name(rule, allocation)
    assume(allocation is None or formable(model, name))  # else refused before any work (tests/test_allocation.py)
    cache = h2o.make_cache(model, name, **surrogate_kw(model, name), buffer=buffer, head_scores=head_scores_for(model), tokenizer=TOKENIZER)
    try:
        if mode == "left-padded batch" and cache.replays:  # refused before the model runs, nothing written
            ids = token_ids(n, batch=batch)
            mask = torch.ones_like(ids)
            mask[0, :2] = 0
            with pytest.raises(ValueError, match="without padding"):
                model(ids, attention_mask=mask, past_key_values=cache)
            assert cache.kv_bytes() == 0 and not cache.held
            return
        feed(model, cache, mode, n, chunks, buffer, batch)
    finally:
        h2o.restore(model)
    assert cache.kv_bytes() > 0


# --- one regression test per defect of the issue ------------------------------------------------------------------


@pytest.mark.parametrize("allocation", ["headkv", "retrieval_0.3_2", "induction_0.3_2", "ablation_0.3_2", "adakv",
                                        "global", "pyramid_4"])
@pytest.mark.parametrize("feeding", ["one forward", "chunks"])
def test_an_allocation_with_fixed_head_groups_evicts_after_a_kvzip_replay(allocation, feeding):
    model = model_for("chunks")
    cache = h2o.make_cache(model, f"{allocation}+kvzip_2_4_12", buffer=2, head_scores=head_scores_for(model),
                           tokenizer=TOKENIZER)
    ids = token_ids(64)
    with torch.no_grad():
        for part in ([ids] if feeding == "one forward" else ids.split(16, dim=1)):
            model(part, past_key_values=cache, use_cache=True)
            for lengths, bounds in zip(cache.head_lengths(), cache.head_bounds()):
                assert all(n <= b for n, b in zip(lengths, bounds)), (lengths, bounds)
    h2o.restore(model)
    assert cache.evicted() and max(cache.kept_lengths()) < 64


@pytest.mark.parametrize("policy", ["adakv+h2o_2_4_12", "global+h2o_2_4_12", "headkv+h2o_2_4_12",
                                    "global+kvzip_2_4_12", "retrieval_0.3_2+kvzip_2_4_12", "kvzip_2_4_12"])
@pytest.mark.parametrize("batch", [1, 2])
def test_memory_held_after_a_prompt_is_memory_counted_and_no_more_than_the_uniform_rule(policy, batch):
    """Head-group and per-row layers kept their keys as views of the buffer from before the eviction (5x the uniform
    rule's bytes after a 120-token prompt; ~10x for global+kvzip at batch 2), and a replay's forwards sized the
    buffers of a uniform kvzip cache."""
    model = model_for("one forward")
    ids = token_ids(120, batch=batch)
    held = {}
    for name in (policy, "h2o_2_4_12"):
        cache = h2o.make_cache(model, name, **surrogate_kw(model, name), buffer=4, head_scores=head_scores_for(model), tokenizer=TOKENIZER)
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
        h2o.restore(model)
        gc.collect()
        held[name] = cache.kv_bytes(bookkeeping=False)
        assert sum(reachable_storages(cache).values()) == cache.kv_bytes()
        for layer, bounds in zip(cache.policy_layers(), cache.head_bounds()):
            assert layer.keys.shape[-2] <= max(bounds) < 120  # never the prompt's length
    assert held[policy] <= held["h2o_2_4_12"], held


def test_kv_bytes_counts_the_storage_a_sliding_window_layer_keeps_alive():
    """transformers' sliding layer keeps its keys as a slice of the concatenated tensor (a 6-layer tiny Gemma 3 reported
    18,944 B and held 130,560 B after a 120-token prompt); h2o's keeps only the window and counts the storage."""
    model = tiny_model("gemma3", "eager", layers=6)
    cache = h2o.make_cache(model, "h2o_2_4_12", buffer=4)
    with torch.no_grad():
        model(token_ids(120), past_key_values=cache, use_cache=True)
    h2o.restore(model)
    for layer, w in zip(cache.layers, cache.windows):
        if w is not None:
            assert layer.keys.untyped_storage().nbytes() == layer.keys.numel() * 4 == 1 * KV_HEADS * (w - 1) * 16 * 4
    assert sum(reachable_storages(cache).values()) == cache.kv_bytes()
    assert cache.kv_bytes(bookkeeping=False) <= uniform_ceiling(model, 1, 4, 1)


@pytest.mark.parametrize("policy", ["kvzip_2_4_12", "global+kvzip_2_4_12", "kvzip_2_4_12+tova"])
def test_a_reset_cache_replays_as_a_new_cache(policy):
    """reset() kept the previous prompt's replay tail: the first replay after it asked to repeat 'starting with' the
    old prompt's last tokens (other kept tokens, logits off by up to 6.3)."""
    model = model_for("chunks")
    first, second = token_ids(40, seed=5), token_ids(40, seed=6)
    reused = h2o.make_cache(model, policy, **surrogate_kw(model, policy), buffer=2, tokenizer=TOKENIZER)
    with torch.no_grad():
        model(first, past_key_values=reused, use_cache=True)
        reused.reset()
        out = model(second, past_key_values=reused, use_cache=True).logits
        fresh = h2o.make_cache(model, policy, **surrogate_kw(model, policy), buffer=2, tokenizer=TOKENIZER)
        expected = model(second, past_key_values=fresh, use_cache=True).logits
    h2o.restore(model)
    assert torch.equal(out, expected)
    for a, b in zip(reused.compressed_layers(), fresh.compressed_layers()):
        assert torch.equal(a.kept_mask(), b.kept_mask())


def test_a_replaying_cache_given_another_batch_size_is_refused_before_the_forward():
    model = model_for("chunks")
    cache = h2o.make_cache(model, "kvzip_2_4_12", buffer=2, tokenizer=TOKENIZER)
    with torch.no_grad():
        model(token_ids(30), past_key_values=cache, use_cache=True)
        before = [layer.kept_mask().clone() for layer in cache.compressed_layers()]
        with pytest.raises(ValueError, match="reset"):
            model(token_ids(30, batch=2), past_key_values=cache, use_cache=True)
        assert not cache.held
        assert all(torch.equal(a, layer.kept_mask()) for a, layer in zip(before, cache.compressed_layers()))
        cache.reset()
        model(token_ids(30, batch=2), past_key_values=cache, use_cache=True)  # after reset: a new batch serves
    h2o.restore(model)
    assert cache.rows() == 2 and cache.evicted()


@pytest.mark.parametrize("policy", ["h2o_2_4_16", "adakv+h2o_2_4_16", "headkv+h2o_2_4_16", "global+h2o_2_4_16",
                                    "kvzip_2_4_16"])
def test_a_cache_used_after_restore_is_refused_with_nothing_written(policy):
    """An allocation cache crashed inside stock SDPA after taking the new tokens; a uniform one ran one step past its
    budget (17 tokens with budget 16, buffer 0) before its error."""
    model = model_for("chunks")
    cache = h2o.make_cache(model, policy, **surrogate_kw(model, policy), buffer=0, head_scores=head_scores_for(model), tokenizer=TOKENIZER)
    ids = token_ids(17)
    with torch.no_grad():
        model(ids[:, :16], past_key_values=cache, use_cache=True)
        h2o.restore(model)
        lengths, seen = cache.head_lengths(), cache.get_seq_length()
        with pytest.raises(UnobservedError, match="Nothing was written"):
            model(ids[:, 16:], past_key_values=cache, use_cache=True)
    assert cache.head_lengths() == lengths and cache.get_seq_length() == seen == 16
    assert all(n <= 16 for layer in cache.head_lengths() for n in layer)


def test_a_kvzip_cache_without_its_replay_hooks_is_refused_not_scored_zero():
    """A kvzip cache whose hooks were removed (restore, then another make_cache on the model) ran with zero scores."""
    model = model_for("chunks")
    cache = h2o.make_cache(model, "kvzip_2_4_12", buffer=2, tokenizer=TOKENIZER)
    h2o.restore(model)
    h2o.make_cache(model, "h2o_2_4_12", buffer=2)  # h2o's attention back, the replay hooks not
    with torch.no_grad(), pytest.raises(UnobservedError, match="replay"):
        model(token_ids(30), past_key_values=cache, use_cache=True)
    h2o.restore(model)
    assert cache.kv_bytes() == 0


def test_an_interrupted_replay_is_named_by_the_next_forward():
    model = model_for("chunks")
    cache = h2o.make_cache(model, "kvzip_2_4_12", buffer=2, tokenizer=TOKENIZER)
    calls = []

    def interrupt(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:  # the replay's forward
            raise KeyboardInterrupt
    hook = model.base_model.register_forward_pre_hook(interrupt, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(KeyboardInterrupt):
            model(token_ids(30), past_key_values=cache, use_cache=True)
    finally:
        hook.remove()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="replay .* did not finish \\(KeyboardInterrupt\\).*reset"):
            model(token_ids(1), past_key_values=cache, use_cache=True)
        with pytest.raises(RuntimeError, match="KeyboardInterrupt"):
            model(token_ids(5), past_key_values=cache, use_cache=True)
        cache.reset()
        model(token_ids(30), past_key_values=cache, use_cache=True)
    h2o.restore(model)
    assert cache.evicted()


def test_a_tokenizer_name_is_a_clear_error():
    model = model_for("chunks")
    with pytest.raises(TypeError, match="the object, not its name"):
        h2o.make_cache(model, "kvzip_2_4_12", tokenizer="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert model.config._attn_implementation == "sdpa"


def test_a_chat_template_that_drops_the_users_text_is_a_clear_error():
    class Rewriting(type(TOKENIZER)):
        chat_template = "{{ 'user: hi' }}"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return "<user>(redacted)</user><assistant>"
    model = model_for("chunks")
    with pytest.raises(ValueError, match="does not reproduce the user's text"):
        h2o.make_cache(model, "kvzip_2_4_12", tokenizer=Rewriting())
    assert model.config._attn_implementation == "sdpa"


def test_a_replay_past_the_trained_context_is_said():
    model = model_for("chunks")  # max_position_embeddings 256
    cache = h2o.make_cache(model, "kvzip_2_4_12", buffer=2, tokenizer=TOKENIZER)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(token_ids(30), past_key_values=cache, use_cache=True)  # the replay reaches 30 + 30 + its prompt
        with pytest.warns(UserWarning, match="past the model's max_position_embeddings \\(256\\)"):
            model(token_ids(120, seed=2), past_key_values=cache, use_cache=True)
    h2o.restore(model)



@pytest.mark.parametrize("allocation", ["retrieval_0.3_2", "induction_0.3_2", "headkv", "pyramid_4"])
@pytest.mark.parametrize("prompt", [13, 15, 16])
def test_a_fixed_plan_spends_the_uniform_rules_tokens_on_a_prompt_shorter_than_its_largest_head_budget(allocation,
                                                                                                       prompt):
    """Issue 38, item 7: a head cannot hold more tokens than the prompt has; what it cannot hold goes to the other
    heads, so after the prompt the heads keep as many tokens in all as the uniform rule (buffer 0: layers x heads x
    budget, less at most a token a head group: a group holds its heads' least share), each within its bound and never
    more than the prompt; decoding, never more than the uniform rule; from the largest head budget on, the plan."""
    model = model_for("chunks")
    cache = h2o.make_cache(model, f"{allocation}+h2o_2_4_12", buffer=0, head_scores=head_scores_for(model),
                           tokenizer=TOKENIZER)
    ids = token_ids(60)
    with torch.no_grad():
        model(ids[:, :prompt], past_key_values=cache, use_cache=True)
        groups = cache.compressed_layers()  # one row: its groups share one fit
        assert groups[0].context_fit is not None and all(sub.context_fit is groups[0].context_fit for sub in groups)
        planned = [sub.policy.budget for sub in groups]
        assert prompt < max(planned) < 60  # the prompt is shorter than the largest head budget; the decoding is not
        held = [n for layer in cache.head_lengths() for n in layer]
        bounds = [b for layer in cache.head_bounds() for b in layer]
        assert len(held) * BUDGET - len(planned) <= sum(held) <= len(held) * BUDGET, (held, planned)
        assert all(n <= min(prompt, b) for n, b in zip(held, bounds)), (held, bounds)
        for t in range(prompt, 60):  # decoding: never more than the uniform rule, at every step
            model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            held = [n for layer in cache.head_lengths() for n in layer]
            assert sum(held) <= len(held) * BUDGET
    h2o.restore(model)
    assert [sub.budget for sub in groups] == planned  # past the largest head budget: the plan itself
    assert sum(held) == len(held) * BUDGET


@settings(max_examples=200, deadline=None)
@given(budgets=st.lists(st.integers(1, 64), min_size=1, max_size=24), seen=st.integers(0, 80))
def test_context_budgets_hold_the_plans_total_within_what_each_head_has_seen(budgets, seen):
    """`context_budgets`: every head at most what it has seen and at least min(its budget, seen); in all, the plan's
    total where the context can fill it (else every head holds the whole context); the plan itself from the largest
    budget on."""
    from h2o.policies.allocation import context_budgets

    out = context_budgets(budgets, seen)
    assert len(out) == len(budgets)
    if seen >= max(budgets):
        assert out == budgets
    else:
        assert all(min(b, seen) <= n <= seen for n, b in zip(out, budgets)), (out, budgets, seen)
        assert sum(out) == min(sum(budgets), seen * len(budgets))
