"""Synthetic retrieval tasks: seeded, length- and depth-exact prompts whose answers occur only in their needles."""

import re

import pytest
from transformers import AutoTokenizer

from h2o.eval import checkpoints, data
from h2o.eval import retrieval as R

LENGTHS = [500, 1000, 2000]
DEPTHS = [0.0, 0.3, 0.7, 1.0]
HAYSTACK_TASKS = [t for t in R.TASKS if t != "kv_retrieval"]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(checkpoints.smollm2_copy())


@pytest.fixture(scope="module")
def haystacks():
    return {"pg19/10146": data.load_document("pg19", "10146")[0], "wikitext": data.load_document("wikitext")[0]}


@pytest.fixture(scope="module")
def grid(tok, haystacks):
    """The cases of every task over LENGTHS x DEPTHS, two per cell, generated once."""
    return {t: R.generate_cases(t, tok, haystacks, LENGTHS, DEPTHS, 2, seed=7) for t in R.TASKS}


def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def opening(case):
    """The answer opening each task's suffix must end with."""
    if case.task in ("niah_multikey", "niah_multivalue"):
        key = re.match(r"One of the special magic numbers for (\S+) is:", case.needles[0]).group(1)
        if case.task == "niah_multikey":
            return f"The special magic number for {key} mentioned in the provided text is"
        return f"The special magic numbers for {key} mentioned in the provided text are"
    if case.task == "variable_tracking":
        value = case.needles[0].rsplit(" ", 1)[1].rstrip(".")
        return (f"Answer: According to the chain(s) of variable assignment in the text above, "
                f"{len(case.references)} variables are assigned the value {value}, they are:")
    return {"passkey": "", "kv_retrieval": '"'}[case.task]


@pytest.mark.parametrize("task", R.TASKS)
def test_deterministic_for_a_seed_and_different_for_another(task, tok, haystacks):
    args = (task, tok, haystacks, [600], [0.0, 0.5], 2)
    first, again = R.generate_cases(*args, seed=3), R.generate_cases(*args, seed=3)
    other = R.generate_cases(*args, seed=4)
    assert first == again
    assert all(a.prompt != b.prompt for a, b in zip(first, other))
    assert len({c.prompt for c in first}) == len(first)  # the cases of a cell differ too


@pytest.mark.parametrize("task", R.TASKS)
def test_cases_come_in_cell_order_with_the_task_settings(task, grid):
    cases = grid[task]
    assert [(c.length, c.depth, c.index) for c in cases] == [(n, d, i) for n in LENGTHS for d in DEPTHS for i in (0, 1)]
    for c in cases:
        assert (c.task, c.seed, c.max_new_tokens) == (task, 7, R.max_new_tokens(task, c.phrasing))
        assert c.scorer == ("first_number" if task == "passkey" else "string_match_all")
        assert c.prompt == c.prefix + c.context + c.suffix
        if task == "kv_retrieval":
            assert c.source == "random UUID pairs"
        else:
            name, a, b = re.fullmatch(r"(pg19/10146|wikitext) chars (\d+)-(\d+)", c.source).groups()
            assert int(a) < int(b)


@pytest.mark.parametrize("task", R.TASKS)
def test_needles_occur_once_and_references_only_inside_them(task, grid):
    for c in grid[task]:
        assert c.needles and c.references
        for n in c.needles:
            assert c.prompt.count(n) == 1 and n in c.context
        for r in c.references:
            assert c.prompt.lower().count(r.lower()) == sum(n.lower().count(r.lower()) for n in c.needles) > 0
    expected = {"passkey": (1, 1), "niah_multikey": (4, 1), "niah_multivalue": (4, 4), "kv_retrieval": (1, 1),
                "variable_tracking": (5, 5)}[task]
    assert all((len(c.needles), len(c.references)) == expected for c in grid[task])


@pytest.mark.parametrize("task", R.TASKS)
def test_total_tokens_are_within_5_percent_of_the_length(task, tok, grid):
    for c in grid[task]:
        total = sum(len(ids) for ids in R.case_token_ids(tok, c))
        assert abs(total - c.length) <= 0.05 * c.length, (c.length, c.depth, total)


@pytest.mark.parametrize("task", HAYSTACK_TASKS)
def test_asked_needle_is_at_the_asked_depth_within_a_sentence(task, tok, grid):
    for c in grid[task]:
        before, after = c.context.split(c.needles[0])
        for n in c.needles[1:]:  # measure over the haystack alone
            before, after = before.replace(n, ""), after.replace(n, "")
        before, after = " ".join(before.split()), " ".join(after.split())
        nb, na = n_tokens(tok, before), n_tokens(tok, after)
        share = nb / (nb + na)
        near = [R._sentences(before)[-1:], R._sentences(after)[:1]]
        slack = max([n_tokens(tok, s[0]) for s in near if s] + [0]) / (nb + na) + 0.02
        assert abs(share - c.depth) <= slack, (c.length, c.depth, share)
        if c.depth == 0.0:
            assert before == ""
        if c.depth == 1.0:
            assert after == ""


def test_kv_asked_pair_sits_at_the_asked_index(grid):
    for c in grid["kv_retrieval"]:
        lines = c.context.split("\n")
        assert lines[0].startswith('{"') and lines[-1].endswith('"}') and len(lines) >= 2
        at = [i for i, line in enumerate(lines) if c.needles[0] in line]
        assert at == [round(c.depth * (len(lines) - 1))]
        assert c.references[0] == c.needles[0].split('": "')[1].rstrip('"')


def test_variable_chain_is_in_order(grid):
    for c in grid["variable_tracking"]:
        positions = [c.context.index(n) for n in c.needles]
        assert positions == sorted(positions)
        assert c.needles[1] == f"VAR {c.references[1]} = VAR {c.references[0]}."


@pytest.mark.parametrize("task", R.TASKS)
def test_prompt_is_chat_framed_and_ends_with_the_answer_opening(task, grid):
    for c in grid[task]:
        assert c.prefix.startswith("<|im_start|>system") and "<|im_start|>user" in c.prefix
        assert "<|im_start|>assistant" in c.suffix and "<|im_start|>assistant" in c.prompt
        assert c.suffix.endswith("<|im_start|>assistant\n" + opening(c))


class PlainTokenizer:
    """The embedded tokenizer without a chat template."""

    chat_template = None

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)


@pytest.mark.parametrize("task", ["passkey", "niah_multikey", "kv_retrieval"])
def test_plain_completion_without_a_chat_template(task, tok, haystacks):
    plain = PlainTokenizer(tok)
    for c in R.generate_cases(task, plain, haystacks, [500], [0.5], 1, seed=1):
        assert "<|im_start|>" not in c.prompt
        assert c.prefix.startswith(("There is", "A special", "Extract"))
        assert abs(sum(len(i) for i in R.case_token_ids(plain, c)) - 500) <= 25
        if task != "passkey":
            assert c.suffix.endswith(" " + opening(c))


def test_special_tokens_in_the_template_text_are_single_tokens(tok, grid):
    c = grid["passkey"][0]
    prefix_ids, _, suffix_ids = R.case_token_ids(tok, c)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert prefix_ids[0] == im_start and im_start in suffix_ids


@pytest.mark.parametrize("task", R.TASKS)
def test_score_dispatches_on_the_scorer(task, grid):
    for c in grid[task][:4]:
        assert R.score(c, " and ".join(c.references)) == 1.0
        assert R.score(c, "I do not know.") == 0.0


def test_first_number_match_near_misses():
    assert R.first_number_match("The pass key is 12345.", "12345") == 1.0
    assert R.first_number_match("12345", "12345") == 1.0
    assert R.first_number_match("123456", "12345") == 0.0
    assert R.first_number_match("The pass key is 1234", "12345") == 0.0
    assert R.first_number_match("The pass key is 54321, no wait, 12345", "12345") == 0.0
    assert R.first_number_match("The pass key is", "12345") == 0.0
    assert R.first_number_match("", "12345") == 0.0


def test_string_match_all_shares_and_near_misses():
    assert R.string_match_all("The value is ABC-def.", ["abc-DEF"]) == 1.0
    assert R.string_match_all("1111111 and 2222222", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert R.string_match_all("they are: 123456", ["1234567"]) == 0.0
    assert R.string_match_all("12345678", ["1234567"]) == 1.0  # a substring match, as RULER scores it
    assert R.string_match_all("", ["x"]) == 0.0
    with pytest.raises(ValueError):
        R.string_match_all("x", [])


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="needle"), "unknown task 'needle'; tasks: passkey, niah_multikey"),
    (dict(depths=[-0.1]), "outside"),
    (dict(depths=[1.5]), "outside"),
    (dict(cases=0), "cases must be a positive integer"),
    (dict(lengths=[60]), "too short for passkey"),
    (dict(task="kv_retrieval", lengths=[150]), "too short for kv_retrieval"),
    (dict(haystacks={}), "non-empty haystack"),
    (dict(haystacks={"blank": " \n "}), "non-empty haystack"),
    (dict(haystacks={"tiny": "One sentence. And another one."}), "haystack 'tiny' is too short"),
    (dict(num_keys=3), "takes no option"),
    (dict(task="niah_multikey", num_keys=0), "num_keys must be a positive integer"),
])
def test_refusals(kwargs, message, tok, haystacks):
    args = dict(task="passkey", tokenizer=tok, haystacks=haystacks, lengths=[500], depths=[0.5], cases=1, seed=0)
    with pytest.raises(ValueError, match=re.escape(message)):
        R.generate_cases(**{**args, **kwargs})


@pytest.mark.parametrize("task", R.TASKS)
def test_every_phrasing_words_the_same_draws_differently_at_the_asked_length(task, tok, haystacks):
    cases = {p: R.generate_cases(task, tok, haystacks, [700], [0.2, 0.8], 1, seed=5, phrasing=p)
             for p in R.PHRASINGS}
    for p, cs in cases.items():
        for c in cs:
            assert c.phrasing == p and c.max_new_tokens == R.max_new_tokens(task, p)
            assert abs(n_tokens(tok, c.prefix) + n_tokens(tok, c.context) + n_tokens(tok, c.suffix) - 700) <= 0.05 * 700
            assert all(n in c.context for n in c.needles)
            for ref in c.references:  # the answer occurs in the needles, nowhere else in the prompt
                outside = c.prompt
                for n in c.needles:
                    outside = outside.replace(n, "")
                if task != "variable_tracking":
                    assert ref.lower() not in outside.lower()
                assert any(ref in n for n in c.needles)
        header = "<|im_start|>assistant\n"  # the chat template's: the answer starts right after it
        if p == "completion":  # the answer's opening follows the header
            assert all(header in c.suffix and not c.suffix.endswith(header) for c in cs)
        else:  # no opening: the model starts the answer itself
            assert all(c.suffix.endswith(header) for c in cs)
    # the same draws in every phrasing: references, haystack start, asked depths
    for i in range(2):
        same = [cases[p][i] for p in R.PHRASINGS]
        assert len({c.references for c in same}) == 1 and len({c.depth for c in same}) == 1
        assert len({c.source.split(" chars ")[0] + c.source.split(" chars ")[-1].split("-")[0] for c in same}) == 1
        # instruction (prefix), question (suffix) and needles all change with the phrasing
        assert len({c.prefix for c in same}) == len({c.suffix for c in same}) == 3
        if task != "kv_retrieval":
            assert len({c.needles for c in same}) == 3


def test_an_unknown_phrasing_is_refused(tok, haystacks):
    with pytest.raises(ValueError, match="unknown phrasing 'terse'; phrasings: answer-only, restate, completion"):
        R.generate_cases("passkey", tok, haystacks, [500], [0.5], 1, seed=0, phrasing="terse")


def test_the_default_phrasing_is_each_tasks_reference_template(tok, haystacks):
    for task in R.TASKS:
        default = R.generate_cases(task, tok, haystacks, [500], [0.5], 1, seed=0)[0]
        assert default.phrasing == R.DEFAULT_PHRASING[task]
        assert default == R.generate_cases(task, tok, haystacks, [500], [0.5], 1, seed=0,
                                           phrasing=R.DEFAULT_PHRASING[task])[0]
