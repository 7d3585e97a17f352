"""Head scores (`h2o.head_scores`, `h2o heads`): the pure reductions exactly, the probe against transformers' own
attention maps, planted induction and retrieval heads found, the model left as it was, the JSON record, the
cache (reused, recomputed when an input changes) and the command end to end."""

import csv
import importlib.util
import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import h2o
from h2o import head_probes as H
from h2o.eval import checkpoints, cli, head_score_cache
from tiny import tiny_model

EMBEDDED_MISSING = importlib.util.find_spec(checkpoints.SMOLLM2_PACKAGE) is None
HAYSTACK = " ".join(f"Sentence number {i} tells of the {w} river and the {v} hills." for i, (w, v) in enumerate(
    zip(["green", "long", "cold", "quiet", "broad"] * 40, ["far", "blue", "old", "steep"] * 50)))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the pure reductions, on hand-made attention ----------------------------------------------------

def test_induction_and_echo_read_the_right_keys_of_the_second_copy():
    r = 3
    probs = torch.zeros(2, 2 * r, 2 * r)  # [heads, queries, keys]
    for i in range(r):
        probs[0, r + i, i + 1] = 1.0  # head 0: a perfect induction head
        probs[1, r + i, i] = 0.5  # head 1: half its attention on the previous occurrence...
        probs[1, r + i, r + i] = 0.5  # ... half on itself
    probs[1, r, 1] = 0.25  # one query of head 1 also looks a little at the induction key
    induction, echo = H.induction_echo_from_attention(probs, r)
    assert induction.tolist() == pytest.approx([1.0, 0.25 / 3])
    assert echo.tolist() == pytest.approx([0.0, 0.5])
    # an offset (e.g. a BOS before the copies) shifts every index
    shifted = torch.zeros(2, 2 * r + 1, 2 * r + 1)
    shifted[:, 1:, 1:] = probs
    assert torch.equal(H.induction_echo_from_attention(shifted, r, start=1)[0], induction)
    with pytest.raises(ValueError, match="does not hold 2 x 4 positions"):
        H.induction_echo_from_attention(probs, 4)


def test_retrieval_hits_count_argmaxes_on_the_needle_token_being_copied():
    ids = [5, 9, 7, 7, 3, 1, 7, 3]  # needle at 1..3 (9 7 7), answer 6..7 (7 3): 7 is copied, 3 is not
    queries, targets = H.copied_targets(ids, range(1, 4), range(6, 8))
    assert queries == [5] and targets.tolist() == [[False, False, True, True, False, False, False, False]]
    probs = torch.zeros(3, 8, 8)
    probs[0, 5, 3] = 1.0  # argmax on a needle 7: a hit
    probs[1, 5, 1] = 1.0  # argmax on the needle's 9: no hit
    probs[2, 5, 6] = 1.0  # argmax on the answer's own 7, outside the needle: no hit
    assert H.retrieval_hits(probs, queries, targets).tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="targets must be"):
        H.retrieval_hits(probs, [5, 6], targets)


def test_a_kv_head_scores_the_max_of_its_query_heads():
    per_query = torch.tensor([[0.1, 0.7, 0.2, 0.0, 0.3, 0.4]])  # 6 query heads, 2 KV heads: 0,1,2 | 3,4,5
    assert H.group_max(per_query, 2).tolist() == [pytest.approx([0.7, 0.4])]
    with pytest.raises(ValueError, match="do not split"):
        H.group_max(per_query, 4)


def test_random_sequences_are_seeded_distinct_and_avoid_the_edges_and_special_ids():
    a = H.random_sequences(49152, 256, 3, seed=4, exclude=[150, 151])
    b = H.random_sequences(49152, 256, 3, seed=4, exclude=[150, 151])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], H.random_sequences(49152, 256, 1, seed=5)[0])
    for x in a:
        assert len(set(x.tolist())) == 256 and 100 <= int(x.min()) and int(x.max()) < 49052
        assert not {150, 151} & set(x.tolist())
    small = H.random_sequences(97, 24, 1)[0]  # a tiny vocabulary: the whole of it
    assert len(set(small.tolist())) == 24 and int(small.max()) < 97


# --- the probe on tiny models ----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_scores_equal_those_from_transformers_attention_maps(family):
    model = tiny_model(family, attn="eager")
    r, repeats = 24, 2
    scores = H.head_scores(model, random_tokens=r, repeats=repeats, seed=3)
    layers, q_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    kv = getattr(model.config, "num_key_value_heads", None) or q_heads
    assert scores.shape == (layers, kv) and set(scores.scores) == {"induction", "echo"}
    induction, echo = torch.zeros(layers, q_heads), torch.zeros(layers, q_heads)
    for x in H.random_sequences(model.config.vocab_size, r, repeats, seed=3):
        with torch.no_grad():
            maps = model(torch.cat([x, x])[None], output_attentions=True).attentions
        for layer in range(layers):
            for h in range(q_heads):
                induction[layer, h] += sum(maps[layer][0, h, r + i, i + 1] for i in range(r)) / r / repeats
                echo[layer, h] += sum(maps[layer][0, h, r + i, i] for i in range(r)) / r / repeats
    group = q_heads // kv
    expected = {"induction": induction.view(layers, kv, group).amax(-1), "echo": echo.view(layers, kv, group).amax(-1)}
    for name in expected:
        assert torch.allclose(scores[name], expected[name], atol=1e-6), name
        assert scores[name].dtype == torch.float32 and bool(((scores[name] >= 0) & (scores[name] <= 1)).all())


def test_scores_are_deterministic_given_the_seed_and_the_model_is_left_as_it_was():
    model = tiny_model("llama")  # sdpa
    model.train()
    ids = torch.arange(12)[None]
    with torch.no_grad():
        model.eval()
        before = model(ids).logits
        model.train()
    a = H.head_scores(model, random_tokens=16, repeats=2, seed=1)
    assert model.config._attn_implementation == "sdpa" and model.training
    b = H.head_scores(model, random_tokens=16, repeats=2, seed=1)
    c = H.head_scores(model, random_tokens=16, repeats=2, seed=2)
    assert all(torch.equal(a[n], b[n]) for n in a.scores)
    assert not torch.equal(a["induction"], c["induction"])
    assert a.method["inputs"] == b.method["inputs"] != c.method["inputs"]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_the_model_is_restored_when_scoring_fails(monkeypatch):
    model = tiny_model("llama")

    def broken(module):
        raise RuntimeError("boom")

    monkeypatch.setattr(H, "_stock_eager", broken)
    with pytest.raises(RuntimeError, match="boom"):
        H.head_scores(model, random_tokens=8, repeats=1)
    assert model.config._attn_implementation == "sdpa"


def plant(monkeypatch, edit):
    """Replace the probe's attention maps by `edit(layer, forward index, probs)` after the real computation."""
    real = H._stock_eager
    seen = {"forwards": -1}

    def stock(module):
        eager = real(module)

        def planted(module, query, key, value, mask, *args, **kwargs):
            out, probs = eager(module, query, key, value, mask, *args, **kwargs)
            if module.layer_idx == 0:
                seen["forwards"] += 1
            edit(module.layer_idx, seen["forwards"], probs)
            return out, probs
        return planted

    monkeypatch.setattr(H, "_stock_eager", stock)


def test_a_planted_induction_head_is_found(monkeypatch):
    r = 20

    def edit(layer, forward, probs):
        if layer == 1:  # query head 3 of layer 1 (KV head 1): attends the token after the previous occurrence
            for i in range(r):
                probs[0, 3, r + i] = 0
                probs[0, 3, r + i, i + 1] = 1.0

    plant(monkeypatch, edit)
    scores = H.head_scores(tiny_model("llama"), random_tokens=r, repeats=2)
    assert scores["induction"][1, 1] == 1.0 and scores.top("induction", 1) == [(1, 1)]
    assert scores["induction"].flatten().sort().values[-2] < 0.5
    assert scores["echo"][1, 1] < 0.5  # head 3 gives the previous occurrence nothing; its group mate, a little


@pytest.fixture(scope="module")
def tok():
    if EMBEDDED_MISSING:
        pytest.skip(f"the embedded model's weights package {checkpoints.SMOLLM2_PACKAGE} is not installed")
    return AutoTokenizer.from_pretrained(checkpoints.smollm2_copy())


def tiny_llama_for(tokenizer):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_needle_cases_hold_the_code_in_the_needle_and_in_the_answer(tok):
    cases = H.needle_cases(tok, [HAYSTACK], 3, 96, seed=5)
    assert cases == H.needle_cases(tok, [HAYSTACK], 3, 96, seed=5)
    assert [c.depth for c in cases] == pytest.approx([0.1, 0.5, 0.9])
    assert len({c.code for c in cases}) == 3
    for c in cases:
        assert 6 <= len(c.code) <= 10 and c.code[0] != "0"
        needle = tok.decode(c.ids[c.needle.start:c.needle.stop])
        assert needle.strip() == f"The secret code is {c.code}. Remember it."
        assert tok.decode(c.ids[c.answer.start:c.answer.stop]).strip() == c.code and c.answer.stop == len(c.ids)
        assert tok.decode(c.ids[:c.answer.start]).rstrip().endswith("assistant\nThe secret code is")  # the chat template
        assert "What is the secret code?" in tok.decode(c.ids[c.needle.stop:c.answer.start])
        assert abs(c.at - c.depth) < 64 / 96 and tok.decode(c.ids[c.needle.start - 1]).strip().endswith(".")
        queries, _ = H.copied_targets(c.ids, c.needle, c.answer)
        assert len(queries) == len(c.answer)  # every code token is copied from the needle


def test_a_planted_retrieval_head_is_found_and_retrieval_needs_a_tokenizer(tok, monkeypatch):
    model = tiny_llama_for(tok)
    repeats, n = 1, 2
    cases = H.needle_cases(tok, [HAYSTACK], n, 80, seed=0)

    def edit(layer, forward, probs):
        if layer == 0 and forward >= repeats:  # query head 2 (KV head 1) looks at the needle token it copies
            case = cases[forward - repeats]
            queries, targets = H.copied_targets(case.ids, case.needle, case.answer)
            for q, row in zip(queries, targets):
                probs[0, 2, q] = 0
                probs[0, 2, q, int(row.nonzero()[0])] = 1.0

    plant(monkeypatch, edit)
    bar = type("Bar", (), {"n": 0, "update": lambda self, k: setattr(self, "n", self.n + k)})()
    scores = H.head_scores(model, tok, [HAYSTACK], random_tokens=16, repeats=repeats, cases=n, context_tokens=80,
                           progress=bar, text_names=["synthetic"])
    assert bar.n == repeats + n
    assert scores.shape == (2, 2) and set(scores.scores) == {"induction", "echo", "retrieval"}
    assert scores["retrieval"][0, 1] == 1.0 and scores.top("retrieval", 1) == [(0, 1)]
    assert scores["retrieval"].flatten().sort().values[-2] < 0.5
    m = scores.method
    assert m["token_counts"]["copied_tokens"] == sum(len(c.answer) for c in cases)
    assert [c["code"] for c in m["cases"]] == [c.code for c in cases] and m["texts"] == ["synthetic"]
    assert m["inputs"]["cases"] == n and len(m["inputs"]["texts_sha256"]) == 1
    with pytest.raises(ValueError, match="without a tokenizer"):
        H.head_scores(model, None, [HAYSTACK], random_tokens=8, repeats=1)


# --- the record ------------------------------------------------------------------------------------

def test_the_json_record_round_trips_exactly_and_ranks_best_first(tmp_path):
    scores = H.HeadScores({"induction": torch.tensor([[0.1, 0.9], [0.3, 0.9]]),
                           "echo": torch.tensor([[1 / 3, 0.0], [0.25, 0.5]])}, {"seed": 0, "note": "x"})
    assert scores.shape == (2, 2)
    assert scores.ranked("induction") == [(0, 1, pytest.approx(0.9)), (1, 1, pytest.approx(0.9)),
                                          (1, 0, pytest.approx(0.3)), (0, 0, pytest.approx(0.1))]
    assert scores.top("echo", 2) == [(1, 1), (0, 0)]
    back = H.HeadScores.from_json(json.loads(json.dumps(scores.to_json())))
    assert back.method == scores.method and all(torch.equal(back[n], scores[n]) for n in scores.scores)
    path = scores.save(tmp_path / "deep" / "s.json")
    assert [p.name for p in path.parent.iterdir()] == ["s.json"]  # no temporary file left
    loaded = H.HeadScores.load(path)
    assert all(torch.equal(loaded[n], scores[n]) for n in scores.scores)
    with pytest.raises(ValueError, match="not a head-scores record"):
        H.HeadScores.from_json({"scores": {}})
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        H.HeadScores({"x": torch.tensor([[1.5]])})
    with pytest.raises(ValueError, match="different shapes"):
        H.HeadScores({"x": torch.zeros(2, 2), "y": torch.zeros(2, 3)})
    with pytest.raises(KeyError, match="no head score 'retrieval'"):
        scores.top("retrieval", 1)
    assert h2o.HeadScores is H.HeadScores and h2o.head_scores is H.head_scores and h2o.head_probes is H


# --- the cache -------------------------------------------------------------------------------------

def test_cache_paths_sit_beside_the_embedded_copy_and_apart_for_other_models(tmp_path, monkeypatch):
    monkeypatch.setenv("H2O_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(checkpoints, "smollm2_copy", lambda: tmp_path / "copy")
    assert head_score_cache.cache_path(checkpoints.EMBEDDED) == tmp_path / "copy" / "head_scores.json"
    a, b = head_score_cache.cache_path("random:tiny-llama"), head_score_cache.cache_path("random_tiny-llama")
    assert a.parent == b.parent == tmp_path / "head_scores" and a != b
    assert a.name.startswith("random_tiny-llama-") and a.suffix == ".json"
    # not inside the embedded copy's folder, which a conversion renames into place
    assert checkpoints.cache_dir() not in a.parents


def test_scores_are_cached_reused_and_recomputed_when_an_input_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("H2O_CACHE_DIR", str(tmp_path))
    model, tokenizer = checkpoints.load_model("random:tiny-llama")
    first = head_score_cache.scores_for(model, tokenizer, "random:tiny-llama", random_tokens=16, repeats=1)
    path = head_score_cache.cache_path("random:tiny-llama")
    assert path.is_file() and "retrieval" not in first.scores
    assert json.loads(path.read_text())["method"]["inputs"]["random_tokens"] == 16

    real, calls = H.head_scores, []

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(H, "head_scores", counted)
    again, _, reused = head_score_cache.lookup(model, tokenizer, "random:tiny-llama", random_tokens=16, repeats=1)
    assert reused and not calls and torch.equal(again["induction"], first["induction"])
    _, _, reused = head_score_cache.lookup(model, tokenizer, "random:tiny-llama", random_tokens=16, repeats=2)
    assert not reused and calls[-1]["repeats"] == 2
    assert json.loads(path.read_text())["method"]["inputs"]["repeats"] == 2  # the file was replaced
    with torch.no_grad():  # other weights under the same name: recomputed
        model.model.layers[0].self_attn.q_proj.weight.mul_(2)
    _, _, reused = head_score_cache.lookup(model, tokenizer, "random:tiny-llama", random_tokens=16, repeats=2)
    assert not reused and len(calls) == 2
    _, _, reused = head_score_cache.lookup(model, tokenizer, "random:tiny-llama", random_tokens=16, repeats=2, recompute=True)
    assert not reused and len(calls) == 3
    path.write_text("{not json")  # a damaged file is recomputed, not an error
    _, _, reused = head_score_cache.lookup(model, tokenizer, "random:tiny-llama", random_tokens=16, repeats=2)
    assert not reused and len(calls) == 4 and H.HeadScores.load(path).shape == (2, 2)
    with pytest.raises(TypeError, match="unknown head-score options: repeat"):
        head_score_cache.scores_for(model, tokenizer, "random:tiny-llama", repeat=2)


# --- the command -----------------------------------------------------------------------------------

def h2o_cli(*argv) -> int:
    try:
        return cli.main([*map(str, argv), "--no-progress"])
    except SystemExit as exit:
        return exit.code


def test_h2o_heads_writes_the_table_csv_json_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("H2O_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert h2o_cli("heads", "--model", "random:tiny-gpt-neox", "--random-tokens", 16, "--random-sequences", 1,
                   "--top", 3, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "top 3 of 8 KV heads by induction:" in printed and "top 3 of 8 KV heads by echo:" in printed
    assert "no retrieval score" in printed and "cached at" in printed
    rows = list(csv.DictReader(open(out / "heads.csv")))
    assert [(int(r["layer"]), int(r["kv_head"])) for r in rows] == [(l, h) for l in range(2) for h in range(4)]
    assert sorted(int(r["induction_rank"]) for r in rows) == list(range(1, 9))
    payload = json.loads((out / "heads.json").read_text())
    scores = H.HeadScores.from_json(payload["head_scores"])
    assert scores.shape == (2, 4) and payload["cache"]["reused"] is False
    assert payload["top"]["induction"][0][:2] == list(scores.top("induction", 1)[0])
    assert float(rows[0]["echo"]) == pytest.approx(float(scores["echo"][0, 0]))
    assert (out / "heads.png").stat().st_size > 5000
    assert h2o_cli("heads", "--model", "random:tiny-gpt-neox", "--random-tokens", 16, "--random-sequences", 1,
                   "--out", out) == 0
    assert "cached scores reused" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--random-sequences", 0], "--random-sequences must be >= 1"),
    (["--cases", -1], "--cases must be >= 0"),
    (["--cases", 2, "--ablation-cases", 1], "--ablation-cases needs needle cases in real text"),
    (["--reconstruction-tokens", 64], "--reconstruction-tokens replays real text"),
    (["--reconstruction-tokens", -1], "--reconstruction-tokens must be >= 0"),
    (["--model", "smollm2-135m", "--calibration-book", "99999999"], "no PG-19 test book '99999999'"),
])
def test_h2o_heads_refuses_bad_input_before_any_work(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert h2o_cli("heads", "--model", "random:tiny-llama", *argv, "--out", out) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_the_default_calibration_book_is_one_no_evaluation_uses():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    sources = [*root.glob("h2o/**/*.py"), root / "README.md", *root.glob("benchmarks/*")]
    used = [p for p in sources if p.is_file() and p.name not in ("heads.py", "head_score_cache.py")
            and head_score_cache.CALIBRATION_BOOK in p.read_text(errors="ignore").replace(",", " ").split()]
    assert not used and head_score_cache.CALIBRATION_BOOK not in ("10146", "10321", "24553", "2544")


@pytest.mark.slow
def test_h2o_heads_on_the_embedded_model_finds_its_copying_heads(tmp_path, monkeypatch):
    if EMBEDDED_MISSING:
        pytest.skip(f"the embedded model's weights package {checkpoints.SMOLLM2_PACKAGE} is not installed")
    checkpoints.smollm2_copy()  # the converted copy, in the usual cache; the scores go to tmp_path, not beside it
    monkeypatch.setattr(head_score_cache, "cache_path", lambda name: tmp_path / "cache" / "head_scores.json")
    out = tmp_path / "out"
    assert h2o_cli("heads", "--random-tokens", 64, "--random-sequences", 1, "--cases", 1, "--context-tokens", 128,
                   "--reconstruction-tokens", 256, "--out", out) == 0
    scores = H.HeadScores.from_json(json.loads((out / "heads.json").read_text())["head_scores"])
    assert scores.shape == (30, 3) and set(scores.scores) == {"induction", "echo", "retrieval", "reconstruction"}
    # the heads the model reads all over the context when it repeats it: the same two copying heads lead
    assert set(scores.top("reconstruction", 3)) >= {(17, 1), (18, 2)}
    # the copying heads of SmolLM2-135M (FIELD-NOTES: layer 17 head 1, layer 18 head 2 lead by far)
    assert set(scores.top("induction", 2)) == {(17, 1), (18, 2)}
    assert {(17, 1), (18, 2)} & set(scores.top("retrieval", 3))
    assert scores.method["calibration_text"]["name"] == "pg19:3129"
    assert (tmp_path / "cache" / "head_scores_reconstruction256.json").is_file()  # its own file, beside the others


# --- ablation: the answer's loss when one KV head keeps only its sinks and recent keys -----------------------

def test_restrict_mask_hides_all_but_sinks_and_recent_from_the_chosen_heads_only():
    query, key = torch.zeros(1, 4, 6, 2), torch.zeros(1, 2, 6, 2)
    mask = H.restrict_mask(None, query, key, heads=(2, 4), window=(1, 2))
    allowed = mask == 0
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(allowed[0, 0], causal) and torch.equal(allowed[0, 1], causal)  # the other group unchanged
    window = causal & ((torch.arange(6) == 0) | (torch.arange(6).unsqueeze(1) - torch.arange(6) < 2))
    assert torch.equal(allowed[0, 2], window) and torch.equal(allowed[0, 3], window)


def test_ablation_scores_the_heads_whose_restriction_costs_the_answer(tok, monkeypatch):
    model = tiny_llama_for(tok)
    cases = H.needle_cases(tok, [HAYSTACK], 2, 80, seed=0)
    bar = type("Bar", (), {"n": 0, "update": lambda self, k: setattr(self, "n", self.n + k)})()
    scores = H.head_scores(model, tok, [HAYSTACK], random_tokens=16, repeats=1, cases=2, context_tokens=80,
                           ablation_cases=2, progress=bar)
    assert bar.n == 1 + 2 + 2 * 4  # random sequence, needle cases, one per KV head and ablation case
    drops = torch.tensor(scores.method["ablation_drops"])
    assert drops.shape == (2, 2) and bool((drops >= 0).all()) and float(drops.max()) > 0
    torch.testing.assert_close(scores["ablation"], (drops / drops.max()).float(), rtol=1e-3, atol=1e-4)  # drops: 6 places
    assert scores.method["inputs"]["ablation_cases"] == 2
    # by hand, for one head: the answer's log-probability with and without the restriction
    with H.probed(model):
        base = H.answer_logprob(model, cases[0], 2, True)
        H._restricted.update(layer=1, heads=(2, 4), window=H.ABLATION_WINDOW)
        try:
            cut = H.answer_logprob(model, cases[0], 2, True)
        finally:
            H._restricted.clear()
    assert cut != base
    # a window covering the whole prompt restricts nothing: no head's drop
    monkeypatch.setattr(H, "ABLATION_WINDOW", (0, 10_000))
    same = H.head_scores(model, tok, [HAYSTACK], random_tokens=16, repeats=1, cases=2, context_tokens=80,
                         ablation_cases=1)
    assert same.method["ablation_drops"] == [[0.0, 0.0], [0.0, 0.0]] and float(same["ablation"].max()) == 0.0


def test_the_ablation_allocation_ranks_heads_by_it():
    policy = h2o.parse("ablation_0.25_2+h2o_2_4_12")
    assert policy.name == "ablation_0.25_2+h2o_2_4_12_mean" and policy.allocation.score == "ablation"
    plans = policy.plan(2, 2, {"ablation": torch.tensor([[0.1, 0.2], [1.0, 0.3]])})
    assert plans[1].groups[0] == ((0,), 24)  # the top quarter of 4 heads: layer 1, KV head 0, at 2 x 12
    with pytest.raises(ValueError, match="'ablation' score"):
        policy.plan(2, 2, {"retrieval": torch.rand(2, 2)})


# --- what a call asks for is what it gets: ablation_cases honoured or refused, and `method` says what was computed --

@pytest.mark.parametrize("tokenizer, texts, cases, ablation_cases, message", [
    (None, None, 8, 2, "this call has no tokenizer"),  # was: silently no ablation score
    ("tok", None, 8, 2, "this call has no calibration texts"),  # was: silently no ablation score
    ("tok", [HAYSTACK], 0, 2, "more than the cases=0"),  # was: silently no ablation score
    ("tok", [HAYSTACK], 2, 3, "more than the cases=2"),  # was: silently 2
])
def test_ablation_cases_that_cannot_be_honoured_are_a_value_error_before_any_work(monkeypatch, tokenizer, texts, cases,
                                                                                  ablation_cases, message):
    """`ablation_cases` was silently capped to `cases`, or ignored without a tokenizer, texts or cases: the error came
    only later, from `h2o.make_cache(model, "ablation_...")`. Now the call refuses it before any forward, and so does
    `method_inputs` (what the on-disk cache compares before it reuses a record)."""
    model = tiny_model("llama")
    tokenizer = object() if tokenizer == "tok" else tokenizer  # never used: the check comes first
    for heavy in ("_forward", "needle_cases", "weights_fingerprint", "probed"):
        monkeypatch.setattr(H, heavy, lambda *a, **k: pytest.fail("work was done before the check"))
    with pytest.raises(ValueError, match=message):
        H.head_scores(model, tokenizer, texts, random_tokens=8, repeats=1, cases=cases, ablation_cases=ablation_cases)
    with pytest.raises(ValueError, match=message):
        H.method_inputs(model, tokenizer, texts, cases=cases, ablation_cases=ablation_cases)
    assert model.config._attn_implementation == "sdpa"  # the model was not touched


def test_method_says_what_was_computed_for_each_score(tok):
    """Without ablation, `method["retrieval"]` read "omitted: cases = 0" beside the retrieval score it had computed."""
    model = tiny_llama_for(tok)
    kw = dict(random_tokens=16, repeats=1, context_tokens=80)
    both = H.head_scores(model, tok, [HAYSTACK], cases=1, **kw)
    assert set(both.scores) == {"induction", "echo", "retrieval"}
    assert both.method["retrieval"].startswith("Retrieval Head (Wu et al. 2024): 1 needle cases")
    assert both.method["ablation"] == "omitted: ablation_cases = 0" and "ablation_drops" not in both.method
    assert both.method["induction"].startswith("RazorAttention")
    none = H.head_scores(model, tok, [HAYSTACK], cases=0, **kw)
    assert set(none.scores) == {"induction", "echo"} and none.method["retrieval"] == "omitted: cases = 0"
    bare = H.head_scores(model, **kw)
    assert set(bare.scores) == {"induction", "echo"} and bare.method["retrieval"] == "omitted: no tokenizer"
    assert bare.method["ablation"] == none.method["ablation"] == "omitted: ablation_cases = 0"
    ablated = H.head_scores(model, tok, [HAYSTACK], cases=2, ablation_cases=2, **kw)
    assert set(ablated.scores) == {"induction", "echo", "retrieval", "ablation"}
    assert ablated.method["retrieval"].startswith("Retrieval Head") and ablated.method["ablation"].startswith("2 needle")
    assert ablated.method["inputs"]["ablation_cases"] == 2


# --- reconstruction: KVzip's context-independent head score (how much of the context the replay reads) ------------

def test_reconstruction_means_average_each_heads_key_scores_without_the_sinks():
    scores = torch.tensor([[[0.9, 0.9, 0.2, 0.4, 0.0], [1.0, 0.1, 0.1, 0.1, 0.1]]])  # [1, 2 heads, 5 keys]
    times = torch.arange(5).expand(1, 2, 5)
    assert H.reconstruction_means(scores, times, sinks=2)[0].tolist() == pytest.approx([0.2, 0.1])
    assert H.reconstruction_means(scores, times, sinks=0)[0].tolist() == pytest.approx([0.48, 0.28])
    # arrival order, not slot order, says which keys are the sinks
    shuffled = torch.tensor([[[3, 0, 1, 4, 2], [3, 0, 1, 4, 2]]])
    assert H.reconstruction_means(scores, shuffled, sinks=2)[0].tolist() == pytest.approx([1.3 / 3, 0.4])
    with pytest.raises(ValueError, match="no key past the first 5"):
        H.reconstruction_means(scores, times, sinks=5)
    with pytest.raises(ValueError, match="differ"):
        H.reconstruction_means(scores, times[..., :4], sinks=1)


def test_reconstruction_windows_are_seeded_bounded_and_start_with_bos(tok):
    windows = H.reconstruction_windows(tok, [HAYSTACK, HAYSTACK[::-1]], 2500, seed=3)
    assert [len(w) for w in windows] == [1 + 834] * 3  # ceil(2500 / 1024) = 3 windows of 834 tokens
    assert all(w[0] == tok.bos_token_id for w in windows)
    whole = H._encode(tok, HAYSTACK)
    assert any(whole[i:i + 834] == windows[0][1:] for i in range(len(whole) - 833))  # a span of its text
    assert windows == H.reconstruction_windows(tok, [HAYSTACK, HAYSTACK[::-1]], 2500, seed=3)
    assert windows != H.reconstruction_windows(tok, [HAYSTACK, HAYSTACK[::-1]], 2500, seed=4)
    short = H.reconstruction_windows(tok, ["A short text of a few words only."], 500)
    assert short == [[tok.bos_token_id] + H._encode(tok, "A short text of a few words only.")]


def test_the_reconstruction_score_is_the_kvzip_caches_own_mean_and_leaves_the_model_as_it_was(tok):
    model = tiny_llama_for(tok)
    scores = H.head_scores(model, tok, [HAYSTACK], random_tokens=16, repeats=1, cases=0, reconstruction_tokens=96,
                           seed=1)
    assert scores.method["reconstruction"].startswith("KVzip's context-independent head score: 1 window(s)")
    assert scores.method["inputs"]["reconstruction_tokens"] == 96
    assert model.config._attn_implementation == "sdpa" and not model.model._forward_pre_hooks
    assert not model.model._forward_hooks
    # by hand, through the public API: a KVzip cache holding the same window whole, its keys' scores averaged
    (window,) = H.reconstruction_windows(tok, [HAYSTACK], 96, seed=1)
    cache = h2o.make_cache(model, f"kvzip_4_0_{len(window)}", buffer=0, tokenizer=tok)
    with torch.no_grad():
        model(torch.tensor([window]), past_key_values=cache, use_cache=True)
    h2o.restore(model)
    expected = torch.stack([(layer.state["score"][0][:, 4:]).mean(-1) for layer in cache.compressed_layers()])
    assert cache.kept_lengths() == [len(window)] * 2  # nothing evicted: every key scored
    torch.testing.assert_close(scores["reconstruction"], expected.clamp(0, 1))
    assert scores.shape == (2, 2) and float(scores["reconstruction"].max()) > 0


@pytest.mark.parametrize("tokenizer, texts, tokens, message", [
    (None, None, 64, "this call has no tokenizer"),
    ("tok", None, 64, "this call has no calibration texts"),
    ("tok", [HAYSTACK], -1, "reconstruction_tokens must be an int >= 0"),
])
def test_reconstruction_that_cannot_be_honoured_is_a_value_error_before_any_work(monkeypatch, tokenizer, texts, tokens,
                                                                                 message):
    model = tiny_model("llama")
    tokenizer = object() if tokenizer == "tok" else tokenizer
    for heavy in ("_forward", "needle_cases", "weights_fingerprint", "probed", "reconstruction_scores"):
        monkeypatch.setattr(H, heavy, lambda *a, **k: pytest.fail("work was done before the check"))
    with pytest.raises(ValueError, match=message):
        H.head_scores(model, tokenizer, texts, random_tokens=8, repeats=1, cases=0, reconstruction_tokens=tokens)
    with pytest.raises(ValueError, match=message):
        H.method_inputs(model, tokenizer, texts, cases=0, reconstruction_tokens=tokens)


def test_the_reconstruction_allocation_ranks_heads_by_it():
    policy = h2o.parse("reconstruction_0.25_2+streaming_4_8")
    assert policy.name == "reconstruction_0.25_2+streaming_4_8" and policy.allocation.score == "reconstruction"
    plans = policy.plan(2, 2, {"reconstruction": torch.tensor([[0.1, 0.7], [0.2, 0.3]]),
                               "retrieval": torch.tensor([[1.0, 0.0], [0.0, 0.0]])})
    # the top quarter of 4 heads by reconstruction (layer 0, KV head 1, not retrieval's) holds 2 x 12; the other three
    # share the rest: (4 x 12 - 24) / 3 = 8 each, StreamingLLM's sinks and a window of 4 (DuoAttention's streaming heads)
    assert plans[0].groups == (((1,), 24), ((0,), 8)) and plans[1].groups == (((0, 1), 8),)
    with pytest.raises(ValueError, match="'reconstruction' score"):
        policy.plan(2, 2, {"retrieval": torch.rand(2, 2)})
