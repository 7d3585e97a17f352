"""`h2o tasks --protocol multi-question / multi-turn`: several needles of one context, its first question's prompt
compressed once; every question from its own fork of that state, or in turn in one conversation (issue 40)."""

import csv
import dataclasses
import importlib.util
import json
import re

import pytest
import torch

import h2o
from h2o.eval import answers, checkpoints, cli, data, retrieval, runners
from h2o.replay import Replay
from tiny import VOCAB, tiny_model

EMBEDDED_MISSING = importlib.util.find_spec(checkpoints.SMOLLM2_PACKAGE) is None


class ByteTokenizer:
    """The tiny models' tokenizer: a byte per token (ids modulo the vocabulary), offsets for ASCII text, no chat
    template, no EOS (so every answer runs to the task's limit); `decode` is invertible (`ids_of`)."""

    chat_template = None
    eos_token_id = bos_token_id = None

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        ids = [b % VOCAB for b in text.encode()]
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(ids))]
        return out

    def encode(self, text, add_special_tokens=False):
        return self(text)["input_ids"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x100 + i) for i in ids)


def ids_of(text: str) -> list[int]:
    return [ord(c) - 0x100 for c in text]


TOKENIZER = ByteTokenizer()
NEEDLES = ("The code of red is 1234.", "The code of blue is 5678.", "The code of green is 9012.")


def tiny_case(**changes) -> retrieval.Case:
    """Three questions of one ~150-token context: more than the tiny policies keep (12 tokens + 3 of buffer)."""
    context = (f"Some text comes first here. {NEEDLES[0]} More filler text goes on and on. {NEEDLES[1]} Then a few "
               f"words more. {NEEDLES[2]} The end.")
    fields = dict(task="niah_multikey", length=160, depth=0.2, index=0, seed=0, source="test", prefix="Remember. ",
                  context=context, suffix="\n\nCode of red?", references=("1234",), needles=NEEDLES, max_new_tokens=4,
                  scorer="string_match_all", phrasing="restate",
                  follow_ups=(("\n\nCode of blue?", ("5678",)), ("\n\nCode of green?", ("9012",))))
    return retrieval.Case(**{**fields, **changes})


_MODEL: dict = {}


def model_for_tests():
    if "llama" not in _MODEL:
        model = tiny_model("llama")
        from h2o.models import compressed_layers
        shape = (len(compressed_layers(model.config)), h2o.models.kv_heads(model.config))
        g = torch.Generator().manual_seed(0)
        scores = {name: torch.rand(shape, generator=g) for name in ("retrieval", "induction", "ablation", "reconstruction")}
        runners.provide_head_scores(model, lambda **options: scores)
        runners.provide_tokenizer(model, TOKENIZER)
        _MODEL["llama"] = model
    return _MODEL["llama"]


def snapshot(cache) -> dict:
    """Every tensor the cache holds, copied bit for bit, its kept masks and its tokens seen."""
    held = {f"{i}:{name}": t.clone().reshape(-1).view(torch.uint8) for i, (name, t) in enumerate(cache.held_tensors())}
    masks = [layer.kept_mask().clone() for layer in cache.policy_layers() if hasattr(layer, "kept_mask")]
    return {"held": held, "masks": masks, "seen": cache.get_seq_length()}


def same(a: dict, b: dict) -> bool:
    return (a["seen"] == b["seen"] and a["held"].keys() == b["held"].keys()
            and all(torch.equal(a["held"][k], b["held"][k]) for k in a["held"])
            and len(a["masks"]) == len(b["masks"]) and all(torch.equal(x, y) for x, y in zip(a["masks"], b["masks"])))


@pytest.fixture
def watched(monkeypatch):
    """Every forward a runner makes (its cache, the ids), every fork (the cache forked, snapshotted then), every
    replay (its cache, the tokens it scores)."""
    seen = {"forwards": [], "forks": [], "replays": []}
    forward, fork, run = runners.CacheRunner.forward, runners.CacheRunner.fork, Replay.run

    def watch_forward(self, ids, logits_to_keep=0):
        seen["forwards"].append((self.cache, ids[0].tolist()))
        return forward(self, ids, logits_to_keep)

    def watch_fork(self):
        seen["forks"].append((self.cache, snapshot(self.cache)))
        return fork(self)

    def watch_run(self, base_model, cache, ids, previous):
        seen["replays"].append((cache, ids.shape[1]))
        return run(self, base_model, cache, ids, previous)

    monkeypatch.setattr(runners.CacheRunner, "forward", watch_forward)
    monkeypatch.setattr(runners.CacheRunner, "fork", watch_fork)
    monkeypatch.setattr(Replay, "run", watch_run)
    return seen


MULTI_QUESTION_POLICIES = ["h2o_2_4_12", "snapkv_2_4_12_4", "tova_2_4_12", "streaming_2_10", "kvzip_2_4_12",
                           "global+kvzip_2_4_12", "adakv+h2o_2_4_12", "headkv+h2o_2_4_12",
                           "retrieval_0.3_2+h2o_2_4_12", "full"]


@pytest.mark.filterwarnings("ignore:.*past the model's max_position_embeddings")
@pytest.mark.parametrize("policy", MULTI_QUESTION_POLICIES)
def test_multi_question_compresses_once_and_answers_every_question_from_the_same_state(policy, watched):
    model, case = model_for_tests(), tiny_case()
    prefix, context, suffix = retrieval.case_token_ids(TOKENIZER, case)
    first, turns = prefix + context + suffix, retrieval.turn_token_ids(TOKENIZER, case)
    try:
        got = answers.respond_questions(model, TOKENIZER, case, policy, "multi-question", buffer=3)
        # the compressed context: the first forward, on the runner's own cache, and its only forward
        original = watched["forwards"][0][0]
        assert watched["forwards"][0][1] == first[:-1]
        assert [ids for cache, ids in watched["forwards"] if cache is original] == [first[:-1]]
        # no other forward: one per answer token, and one feed per follow-up
        assert len(watched["forwards"]) == 1 + case.questions * case.max_new_tokens + case.questions - 1
        # every question from a fork of it, which never changed: at each fork and after the last answer
        assert len(watched["forks"]) == case.questions and all(c is original for c, _ in watched["forks"])
        before = watched["forks"][0][1]
        assert all(same(state, before) for _, state in watched["forks"]) and same(snapshot(original), before)
        if "kvzip" in policy:  # the context replayed once, at the compression; a fork replays its own feed only
            assert [n for cache, n in watched["replays"] if cache is original] == [len(first) - 1]
            forked = [n for cache, n in watched["replays"] if cache is not original]
            assert len(forked) == 2 and max(forked) < len(context)
        # a follow-up: the first prompt's last token, the first answer as given, the follow-up's turn
        reply = ids_of(got[0].text)
        assert len(reply) == case.max_new_tokens
        feeds = [ids for cache, ids in watched["forwards"] if cache is not original and len(ids) > 1]
        assert feeds == [[first[-1]] + reply + turn[:-1] for turn in turns]
        assert [a.prompt_tokens for a in got] == [len(first)] + [len(first) + len(reply) + len(t) for t in turns]
        assert [a.question for a in got] == [1, 2, 3]
        assert len({a.kv_bytes for a in got}) == 1  # held right after the compression
        assert all(a.compressed == (policy != "full") for a in got)
        # question 1 is the question-aware protocol's answer, from the same compressed state
        alone = answers.respond(model, TOKENIZER, case, policy, "question-aware", buffer=3)
        assert (alone.text, alone.kept_per_layer, alone.answer_held, alone.kv_bytes) == (
            got[0].text, got[0].kept_per_layer, got[0].answer_held, got[0].kv_bytes)
    finally:
        h2o.restore(model)


@pytest.mark.filterwarnings("ignore:.*past the model's max_position_embeddings")
@pytest.mark.parametrize("policy", ["h2o_2_4_12", "kvzip_2_4_12", "global+kvzip_2_4_12", "full"])
def test_multi_turn_keeps_every_answer_in_the_one_cache(policy, watched, monkeypatch):
    model, case = model_for_tests(), tiny_case()
    prefix, context, suffix = retrieval.case_token_ids(TOKENIZER, case)
    first, turns = prefix + context + suffix, retrieval.turn_token_ids(TOKENIZER, case)
    try:
        forked = answers.respond_questions(model, TOKENIZER, case, policy, "multi-question", buffer=3)[0]
        for seen in watched.values():
            seen.clear()
        monkeypatch.setattr(runners.CacheRunner, "fork", lambda self: pytest.fail("multi-turn forked the cache"))
        got = answers.respond_questions(model, TOKENIZER, case, policy, "multi-turn", buffer=3)
        caches = {id(cache) for cache, _ in watched["forwards"]}
        assert len(caches) == 1
        cache = watched["forwards"][0][0]
        replies = [ids_of(a.text) for a in got]
        assert all(len(r) == case.max_new_tokens for r in replies)  # no EOS: each answer runs to the limit
        # one conversation: the first prompt, its answer, the next question's turn, its answer, ... (the last answer's
        # last token never fed: nothing follows it); only the first forward holds the context
        conversation = first + replies[0] + turns[0] + replies[1] + turns[1] + replies[2][:-1]
        assert sum((ids for _, ids in watched["forwards"]), []) == conversation
        assert cache.get_seq_length() == len(conversation)
        assert [len(ids) for _, ids in watched["forwards"] if len(ids) > 1] == [
            len(first) - 1, 1 + len(turns[0]) - 1, 1 + len(turns[1]) - 1]
        assert [a.prompt_tokens for a in got] == [len(first), len(first) + len(replies[0]) + len(turns[0]),
                                                  len(first) + sum(map(len, replies[:2])) + sum(map(len, turns))]
        if "kvzip" in policy:
            assert [n for _, n in watched["replays"]][0] == len(first) - 1
            assert all(n < len(context) for _, n in watched["replays"][1:])
        # its first answer is multi-question's (the same compression, the same first question)
        assert got[0] == forked
    finally:
        h2o.restore(model)


class ScriptedRunner:
    """Answers with scripted tokens (a stop token ends an answer); records what it was fed."""

    def __init__(self, script):
        self.script, self.fed = list(script), []

    def forward(self, ids, logits_to_keep=0):
        self.fed.append(ids[0].tolist())
        logits = torch.zeros(1, 1, VOCAB)
        if ids.shape[1] == 1 and self.script:
            logits[0, -1, self.script.pop(0)] = 1.0
        return logits

    check = close = lambda self: None
    kept_lengths = lambda self: [5]  # noqa: E731
    compressed = lambda self: True  # noqa: E731
    kv_bytes = lambda self: 100  # noqa: E731
    kept_share = lambda self, positions: [1.0]  # noqa: E731
    budget_for = lambda self, prompt: 5  # noqa: E731


def test_a_stop_token_is_never_fed_and_the_next_turn_follows_the_answer(monkeypatch):
    stop = 7
    tokenizer = ByteTokenizer()
    tokenizer.eos_token_id = stop
    runner = ScriptedRunner([50, 51, stop, 60, 61, 62, 63, 70, stop])  # 2 tokens then stop; 4 (the limit); 1, stop
    monkeypatch.setattr(answers, "open_runner", lambda *a, **k: runner)
    model = torch.nn.Linear(1, 1)
    model.generation_config = type("G", (), {"eos_token_id": None})()
    case = tiny_case()
    first = sum(retrieval.case_token_ids(tokenizer, case), [])
    turns = retrieval.turn_token_ids(tokenizer, case)
    got = answers.respond_questions(model, tokenizer, case, "h2o_2_4_12", "multi-turn")
    assert [ids_of(a.text) for a in got] == [[50, 51], [60, 61, 62, 63], [70]]
    assert sum(runner.fed, []) == first + [50, 51] + turns[0] + [60, 61, 62, 63] + turns[1] + [70]


def test_a_runner_that_cannot_fork_is_refused_under_multi_question(monkeypatch):
    runner = ScriptedRunner([])
    closed = []
    runner.close = lambda: closed.append(True)
    monkeypatch.setattr(answers, "open_runner", lambda *a, **k: runner)
    with pytest.raises(ValueError, match="this runner's cache cannot be forked"):
        answers.respond_questions(torch.nn.Linear(1, 1), ByteTokenizer(), tiny_case(), "kvpress:snapkv@0.5",
                                  "multi-question")
    assert closed and runner.fed == []  # nothing fed


# --- rows, summaries, paired tests ----------------------------------------------------------------------------------

def test_each_question_index_is_scored_against_the_full_caches_answers_to_that_question(monkeypatch):
    # 4 cases of 3 questions. full: question 1 all, question 2 cases 0-2, question 3 none; the policy: question 1 all,
    # question 2 case 0 (and case 3, which the full cache failed), question 3 case 1
    solved = {("full", 1): {0, 1, 2, 3}, ("full", 2): {0, 1, 2}, ("full", 3): set(),
              ("streaming_4_12", 1): {0, 1, 2, 3}, ("streaming_4_12", 2): {0, 3}, ("streaming_4_12", 3): {1}}

    def respond_questions(model, tokenizer, case, policy, protocol, **kw):
        assert protocol == "multi-question"
        return [answers.Answer("x", float(case.index in solved[policy, q]), 100, 16, policy != "full", question=q)
                for q in range(1, case.questions + 1)]

    monkeypatch.setattr(answers, "respond_questions", respond_questions)
    monkeypatch.setattr(answers, "respond", lambda *a, **k: pytest.fail("a single-question answer"))
    monkeypatch.setattr(answers.h2o, "restore", lambda model: None)
    cases = [tiny_case(index=i) for i in range(4)]
    rows = answers.run_cases(None, None, cases, [answers.Variant("streaming_4_12", "16", name="streaming_4_12")],
                             "multi-question", chunk=8, positions="original", buffer=0)
    assert len(rows) == 4 * 2 * 3
    for r in rows:  # every row's control: the full cache's answer to that same question of that case
        assert r["full_solved"] == (r["index"] in solved["full", r["question"]])
        assert r["references"] == " | ".join(cases[0].references_of(r["question"]))
    summary, notes = answers.summarize(rows, min_solved=1)
    assert [(r["question"], r["policy"]) for r in summary] == [
        (q, p) for q in (1, 2, 3) for p in ("full", "streaming_4_12")]
    at = {(r["question"], r["policy"]): r for r in summary}
    assert [at[q, "full"]["full_solved"] for q in (1, 2, 3)] == [4, 3, 0]
    assert (at[1, "streaming_4_12"]["policy_solved"], at[1, "streaming_4_12"]["control"]) == (4, 4)
    assert (at[2, "streaming_4_12"]["policy_solved"], at[2, "streaming_4_12"]["control"]) == (1, 3)
    assert at[2, "streaming_4_12"]["kept_share"] == pytest.approx(1 / 3)
    assert at[2, "streaming_4_12"]["kept_low"] < 1 / 3 < at[2, "streaming_4_12"]["kept_high"]
    assert at[2, "streaming_4_12"]["policy_accuracy"] == 0.5  # cases 0 and 3: raw, not among the control
    assert at[3, "streaming_4_12"]["kept_share"] is None and at[3, "full"]["full_interval"].startswith("[")
    assert len(notes) == 1 and "niah_multikey (restate, question 3): the full cache solved 0 of 4" in notes[0]
    paired = {(c["question"], c["policy_a"], c["policy_b"]): c for c in answers.compare(rows)}
    assert set(paired) == {(1, "full", "streaming_4_12"), (2, "full", "streaming_4_12")}  # question 3: unscored
    assert (paired[1, "full", "streaming_4_12"]["cases"], paired[1, "full", "streaming_4_12"]["a_only"]) == (4, 0)
    assert (paired[2, "full", "streaming_4_12"]["cases"], paired[2, "full", "streaming_4_12"]["a_only"]) == (3, 2)


def test_choose_reads_each_question_index_as_a_cell_of_its_own():
    from h2o.eval import selection

    def row(policy, question, share):
        return {"task": "niah_multikey", "phrasing": "completion", "question": question, "policy": policy,
                "budget": "64", "kept_share": share, "policy_solved": int(4 * share), "control": 4,
                "interval": "[0, 1]"}

    summary = [row("h2o_4_8_64", 1, 1.0), row("h2o_4_8_64", 2, 1.0), row("tova_4_8_64", 1, 1.0),
               row("tova_4_8_64", 2, 0.5)]
    cells = selection.task_cells(summary, [], "multi-question", "tuning", ["tova_4_8_64"], "h2o_4_8_64")
    assert [(c["where"], c["value"], c["reference_value"], c["below"]) for c in cells] == [
        ("niah_multikey / multi-question / completion / question 1 @ 64", 1.0, 1.0, False),
        ("niah_multikey / multi-question / completion / question 2 @ 64", 0.5, 1.0, True)]


def test_single_question_rows_are_question_1(monkeypatch):
    monkeypatch.setattr(answers, "respond", lambda model, tokenizer, case, policy, protocol, **kw: answers.Answer(
        "x", 1.0, 100, 16 if policy != "full" else 99, policy != "full"))
    monkeypatch.setattr(answers.h2o, "restore", lambda model: None)
    case = tiny_case(follow_ups=(), task="passkey", scorer="first_number", references=("12345",), needles=("n",))
    rows = answers.run_cases(None, None, [case], [answers.Variant("streaming_4_12", "16", name="streaming_4_12")],
                             "question-aware", chunk=8, positions="original", buffer=0)
    assert [r["question"] for r in rows] == [1, 1]
    summary, _ = answers.summarize(rows, min_solved=1)
    assert [r["question"] for r in summary] == [1, 1] and summary[1]["kept_share"] == 1.0
    assert [c["question"] for c in answers.compare(rows)] == [1]
    # the unit of a single-question case is the one it was before follow-ups existed (a resumed run reuses it)
    unit = answers.case_unit(case, "full", "question-aware", 8, "original", 0)
    assert "follow_ups" not in unit.spec["case"]
    assert retrieval.Case.from_dict(json.loads(json.dumps(unit.spec["case"]))) == case
    multi = answers.case_unit(tiny_case(), "full", "multi-question", 8, "original", 0)
    assert retrieval.Case.from_dict(json.loads(json.dumps(multi.spec["case"]))) == tiny_case()


def test_respond_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="respond_questions answers them"):
        answers.respond(None, TOKENIZER, tiny_case(), "full", "multi-question")
    with pytest.raises(ValueError, match="this niah_multikey case asks one"):
        answers.respond_questions(None, TOKENIZER, tiny_case(follow_ups=()), "full", "multi-turn")


# --- the cases ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(checkpoints.smollm2_copy())


@pytest.fixture(scope="module")
def haystacks():
    return {"pg19/10146": data.load_document("pg19", "10146")[0]}


@pytest.mark.parametrize("phrasing", retrieval.PHRASINGS)
def test_niah_multikey_asks_every_key_of_the_same_context(tok, haystacks, phrasing):
    multi = retrieval.generate_cases("niah_multikey", tok, haystacks, [500], [0.3], 1, seed=3, phrasing=phrasing,
                                     questions=4)[0]
    single = retrieval.generate_cases("niah_multikey", tok, haystacks, [500], [0.3], 1, seed=3, phrasing=phrasing)[0]
    assert dataclasses.replace(multi, follow_ups=()) == single  # the same case, its other keys asked too
    assert multi.questions == 4 and len(multi.needles) == 4
    values = [multi.references_of(q)[0] for q in range(1, 5)]
    assert len(set(values)) == 4
    for q, needle in enumerate(multi.needles, 1):  # question q asks the key of needle q, whose value is its answer
        assert multi.context.count(needle) == 1 and values[q - 1] in needle
        assert sum(v in needle for v in values) == 1
        key = re.search(r"[a-z]+-[a-z]+", needle).group()
        asked = multi.suffix if q == 1 else multi.follow_ups[q - 2][0]
        assert key in asked and all(k not in asked for k in re.findall(r"[a-z]+-[a-z]+", " ".join(multi.needles))
                                    if k != key)
    six = retrieval.generate_cases("niah_multikey", tok, haystacks, [500], [0.3], 1, seed=3, phrasing=phrasing,
                                   questions=6)[0]
    assert six.questions == 6 and len(six.needles) == 6  # more keys where more are asked


def test_a_follow_up_turn_continues_the_chat_templates_conversation(tok, haystacks):
    case = retrieval.generate_cases("niah_multikey", tok, haystacks, [500], [0.5], 1, seed=1, phrasing="completion",
                                    questions=2)[0]
    user = case.prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    opening = case.prompt.rsplit("<|im_start|>assistant\n", 1)[1]
    key = re.search(r"for (\S+) is:", case.needles[1]).group(1)
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    said = opening + " 1234567."
    conversation = tok.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": said},
                                            {"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    assert case.prompt + " 1234567." + case.follow_ups[0][0] == (
        conversation + f"The special magic number for {key} mentioned in the provided text is")


def test_kv_retrieval_asks_other_pairs_of_its_object(tok):
    case = retrieval.generate_cases("kv_retrieval", tok, {}, [600], [0.5], 1, seed=2, questions=3)[0]
    single = retrieval.generate_cases("kv_retrieval", tok, {}, [600], [0.5], 1, seed=2)[0]
    assert (case.context, case.prompt, case.references) == (single.context, single.prompt, single.references)
    assert case.questions == 3 and len(set(case.needles)) == 3
    for q, needle in enumerate(case.needles, 1):
        key, value = re.fullmatch(r'"(\S+)": "(\S+)"', needle).groups()
        assert case.context.count(needle) == 1 and case.references_of(q) == (value,)
        assert key in (case.suffix if q == 1 else case.follow_ups[q - 2][0])
    with pytest.raises(ValueError, match="too short for 40 questions of kv_retrieval"):
        retrieval.generate_cases("kv_retrieval", tok, {}, [300], [0.5], 1, seed=2, questions=40)


def test_without_a_chat_template_a_follow_up_is_a_plain_completion(haystacks):
    case = retrieval.generate_cases("niah_multikey", ByteTokenizer(), haystacks, [1500], [0.5], 1, seed=0,
                                    phrasing="completion", questions=2)[0]
    turn = case.follow_ups[0][0]
    assert turn.startswith("\n\nWhat is the special magic number for ") and turn.endswith(" mentioned in the provided "
                                                                                        "text is")


def test_every_task_says_whether_it_asks_several_questions():
    assert set(retrieval.MULTI_QUESTION_TASKS) | set(retrieval.ONE_QUESTION) == set(retrieval.TASKS)
    assert not set(retrieval.MULTI_QUESTION_TASKS) & set(retrieval.ONE_QUESTION)
    assert set(retrieval.PROTOCOLS) == {"question-aware", "streaming", "multi-question", "multi-turn"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(questions=0), "questions must be a positive integer, got 0"),
    (dict(questions=5, num_keys=3), "5 questions need as many keys; num_keys is 3"),
])
def test_bad_question_counts_are_refused(kwargs, message, haystacks):
    with pytest.raises(ValueError, match=re.escape(message)):
        retrieval.generate_cases("niah_multikey", ByteTokenizer(), haystacks, [1500], [0.5], 1, seed=0, **kwargs)


@pytest.mark.parametrize("task", ["passkey", "niah_multivalue", "variable_tracking"])
def test_a_task_of_one_question_refuses_follow_ups(task, haystacks):
    with pytest.raises(ValueError, match=f"{task} asks one question of a context .*niah_multikey, kv_retrieval"):
        retrieval.generate_cases(task, ByteTokenizer(), haystacks, [300], [0.5], 1, seed=0, questions=2)


# --- the command -------------------------------------------------------------------------------------------------

def h2o_tasks(*argv) -> int:
    try:
        return cli.main(["tasks", *map(str, argv), "--no-progress"])
    except SystemExit as exit:  # argparse's own errors
        return exit.code


def fake_kvpress(monkeypatch):
    monkeypatch.setattr(runners, "check_kvpress", lambda: None)
    monkeypatch.setattr(runners, "_press_classes", lambda: {"snapkv": object})


@pytest.mark.parametrize("argv, message", [
    (["--protocol", "multi-question"], "passkey asks one (its context hides one pass key); niah_multivalue asks one"),
    (["--protocol", "multi-turn", "--tasks", "niah_multikey", "variable_tracking"],
     "variable_tracking asks one (its one chain is asked as a whole, in one question). The tasks that serve it: "
     "niah_multikey, kv_retrieval (--tasks niah_multikey kv_retrieval)"),
    (["--protocol", "multi-question", "--tasks", "niah_multikey", "--questions", "1"], "--questions must be >= 2"),
    (["--protocol", "multi-question", "--tasks", "kv_retrieval", "--policies", "kvpress:snapkv@0.5"],
     "kvpress:snapkv@0.5: --protocol multi-question answers every question from a fork"),
    (["--protocol", "multi-question", "--tasks", "kv_retrieval", "--policies", "kvpress:decoding:snapkv@64"],
     "cannot be forked"),
    (["--protocol", "multi-turn", "--tasks", "niah_multikey", "--policies", "kvpress:snapkv"],
     "kvpress:snapkv: a kvpress prefill press compresses only the first forward, so under --protocol multi-turn"),
    (["--protocol", "multi-turn", "--tasks", "niah_multikey", "--lengths", "7000", "--questions", "20"],
     "multi-turn conversations of 7000 tokens plus the answer pass the model's trained context of 8192"),
])
def test_what_the_multi_question_protocols_cannot_serve_is_refused_before_the_model_loads(
        monkeypatch, tmp_path, capsys, argv, message):
    if EMBEDDED_MISSING and "8192" in message:
        pytest.skip("the trained context comes from the embedded model's config")
    fake_kvpress(monkeypatch)
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert h2o_tasks("--out", out, *argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_decoding_press_may_run_multi_turn(monkeypatch):
    fake_kvpress(monkeypatch)
    from h2o.eval.commands import tasks
    args = cli.build_parser("tasks").parse_args(["tasks", "--protocol", "multi-turn", "--tasks", "niah_multikey",
                                                 "--policies", "kvpress:decoding:snapkv@64", "--text-file", __file__])
    assert [v.label for v in tasks.check(args)["variants"]] == ["kvpress:decoding:snapkv@64"]


@pytest.mark.slow
def test_multi_question_end_to_end_on_the_embedded_model(tmp_path, capsys):
    if EMBEDDED_MISSING:
        pytest.skip(f"the embedded model's weights package {checkpoints.SMOLLM2_PACKAGE} is not installed")
    out = tmp_path / "out"
    assert h2o_tasks("--protocol", "multi-question", "--tasks", "niah_multikey", "--questions", 2, "--lengths", 256,
                     "--depths", 0.5, "--cases", 1, "--policies", "h2o_4_8_64", "--buffer", 0, "--min-solved", 1,
                     "--phrasings", "completion", "--corpus", "pg19", "--pg19-book", "10146", "--out", out) == 0
    for name in ("tasks.csv", "tasks_cases.csv", "tasks_paired.csv", "tasks.json", "tasks_kept_by_question.png"):
        assert (out / name).stat().st_size > 0
    summary = list(csv.DictReader(open(out / "tasks.csv")))
    assert [(r["question"], r["policy"], r["cases"]) for r in summary] == [
        ("1", "full", "1"), ("1", "h2o_4_8_64_mean", "1"), ("2", "full", "1"), ("2", "h2o_4_8_64_mean", "1")]
    cases = list(csv.DictReader(open(out / "tasks_cases.csv")))
    assert [(c["question"], c["policy"]) for c in cases] == [("1", "full"), ("2", "full"), ("1", "h2o_4_8_64_mean"),
                                                             ("2", "h2o_4_8_64_mean")]
    assert len({c["references"] for c in cases}) == 2
    ledger = [json.loads(line) for line in open(out / "tasks_units.jsonl")][1:]  # a case's wall time: its unit's
    assert len(ledger) == 2 and all(u["seconds"] > 0 and len(u["result"]["answers"]) == 2 for u in ledger)
    for c in cases:  # each row's control: the full cache's answer to that question
        full = next(f for f in cases if f["policy"] == "full" and f["question"] == c["question"])
        assert c["full_solved"] == full["solved"]
    record = json.loads((out / "tasks.json").read_text())
    assert record["protocol"] == "multi-question" and record["questions"] == 2 and len(record["cases"]) == 4
    printed = capsys.readouterr().out
    assert "| Question" in printed and "protocol multi-question (2 questions per context" in printed
