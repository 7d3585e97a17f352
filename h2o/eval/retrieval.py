"""Seeded synthetic retrieval tasks and their scorers (pure Python plus a tokenizer; no model is loaded).

Each `Case` is one prompt in three parts, `prefix + context + suffix`: the prefix is the chat template's start
(system prompt, user turn) and the task instruction, the context is the haystack with the needle statements
inserted between its sentences, and the suffix is the question, the end of the user turn, the assistant
header and the answer opening. Without a chat template the prompt is a plain completion:
`instruction + "\\n\\n" + context + "\\n\\n" + question + " " + opening`. The prompt's token count (the three parts
tokenized on their own, `case_token_ids`) is fitted to the asked length: whole haystack sentences first, then,
if that misses by more than 1%, the words of one last, cut sentence (kv_retrieval: whole pairs, then filler
pairs redrawn until the UUIDs' token counts close the gap). The asked needle goes at the sentence boundary
where the share of haystack tokens before it is nearest the asked depth (0: before the first sentence,
1: after the last). Every drawn number, key and name is redrawn while it occurs (case-insensitively) in the
haystack window of the case, in the fixed text or in another drawn item, so the references occur only in
their needles.

passkey (landmark attention, Mohtashami & Jaggi 2023, llama/run_test.py)
    instruction "There is an important piece of information hidden inside a lot of irrelevant text. Find it
                and memorize it. I will quiz you about the important information there."
    needle      "The pass key is {N}. Remember it. {N} is the pass key."  (N: random 5-digit number)
    question    "What is the pass key?"   opening: none   max_new_tokens 24 (the model restates the phrase)
    scoring     first_number: 1 iff the first maximal run of digits in the answer is exactly N, else 0.
niah_multikey (RULER niah_multikey_1: essay haystack, 4 word keys, 1 number value each, 1 query)
    instruction "A special magic number is hidden within the following text. Make sure to memorize it.
                I will quiz you about the number afterwards."
    needles     "One of the special magic numbers for {key} is: {value}." for num_keys (4) keys such as
                "sticky-breakfast", values random 7-digit numbers; the asked (first) key's needle at the
                asked depth, the distractors at random depths
    question    "What is the special magic number for {key} mentioned in the provided text?"
    opening     "The special magic number for {key} mentioned in the provided text is"   max_new_tokens 12
    scoring     string_match_all over [value]
niah_multivalue (RULER niah_multivalue: 1 key, 4 values)
    instruction "Some special magic numbers are hidden within the following text. Make sure to memorize it.
                I will quiz you about the numbers afterwards."
    needles     the same statement for one key and num_values (4) values; the first at the asked depth
    question    "What are all the special magic numbers for {key} mentioned in the provided text?"
    opening     "The special magic numbers for {key} mentioned in the provided text are"   max_new_tokens 64
    scoring     string_match_all over all values (the share of them found)
kv_retrieval (Lost in the Middle, Liu et al. 2023, kv_retrieval.prompt)
    instruction "Extract the value corresponding to the specified key in the JSON object below.\\n\\nJSON data:"
    context     a JSON object of random UUID4 -> UUID4 pairs, one pair a line (LitM layout: '{"k": "v",\\n'
                ' "k": "v",\\n' ... ' "k": "v"}'), as many pairs as fit; the asked pair at index
                round(depth * (n - 1)); no book text
    question    'Key: "{key}"\\nCorresponding value:'   opening '"'   max_new_tokens 40
    scoring     string_match_all over [value]
variable_tracking (RULER vt: 1 chain, 4 hops)
    instruction "Memorize and track the chain(s) of variable assignment hidden in the following text."
    needles     "VAR {X1} = {value}." then "VAR {X2} = VAR {X1}." ... (num_hops + 1 statements, names 5 random
                uppercase letters, value a random 5-digit number); the first at the asked depth, the others
                in order at random increasing depths between it and the end of the context
    question    "Question: Find all variables that are assigned the value {value} in the text above."
    opening     "Answer: According to the chain(s) of variable assignment in the text above, {num_hops + 1}
                variables are assigned the value {value}, they are:"   max_new_tokens 40
    scoring     string_match_all over all num_hops + 1 variable names

Phrasings (`PHRASINGS`, `TEXTS`): every task is worded three ways, over the same draws (the same seed gives the
same haystack start, keys, values and depths in each): "completion" gives the answer's opening and the model
completes it (RULER's and Lost in the Middle's templates above), "restate" gives no opening, so the model answers
in its own words (landmark attention's passkey prompt above; the model often restates the question first), and
"answer-only" asks for the bare answer ("Answer with the number only."). Instruction, needle and question change
with the phrasing; the scorer does not. The templates above are each task's `DEFAULT_PHRASING`.

Scoring as RULER (scripts/eval/synthetic/constants.py): string_match_all is the share of references found as
case-insensitive substrings of the answer; a case scores in [0, 1].

Several questions of one context (`generate_cases(questions=n)`, the multi-question and multi-turn protocols of
`h2o tasks`; tasks `MULTI_QUESTION_TASKS`): niah_multikey asks each of its keys in turn (the first at the asked
depth; num_keys raised to n where n > 4), kv_retrieval n pairs of its object (the first at the asked index, the
others drawn after the fit). The first question is the case's own (`suffix`, `references`); each follow-up
(`Case.follow_ups`: its turn and references) is asked in a turn of its own after an answer: the chat template's
end of the assistant's turn, a user turn with the question, the assistant's header, the answer opening (plain
completion: "\n\n" + question + " " + opening). passkey, niah_multivalue and variable_tracking ask one question of
a context (`ONE_QUESTION` says why) and refuse n > 1.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from dataclasses import dataclass
from typing import Callable, Sequence

from .data import adds_bos

TASKS = ("passkey", "niah_multikey", "niah_multivalue", "kv_retrieval", "variable_tracking")
OPTIONS = {"passkey": {}, "niah_multikey": {"num_keys": 4}, "niah_multivalue": {"num_values": 4},
           "kv_retrieval": {}, "variable_tracking": {"num_hops": 4}}
MAX_NEW_TOKENS = {"passkey": 24, "niah_multikey": 12, "niah_multivalue": 64, "kv_retrieval": 40,
                  "variable_tracking": 40}
RESTATE_TOKENS = 24  # more answer tokens where no opening is given: the model restates the question first


def max_new_tokens(task: str, phrasing: str) -> int:
    """The answer's token limit: the task's (MAX_NEW_TOKENS, sized for RULER's openings) plus RESTATE_TOKENS in a
    phrasing without an opening (passkey's limit already allows for the restatement)."""
    return MAX_NEW_TOKENS[task] + (0 if phrasing == "completion" or task == "passkey" else RESTATE_TOKENS)
_MARK = "\u27e6H2O-CONTEXT-MARK\u27e7"
_FINE = 0.01  # aim: prompt tokens within 1% of the asked length
_MIN_CONTEXT = 16  # tokens of haystack a case needs at least
_CHARS_PER_TOKEN = 6  # generous: the window of haystack text a case draws from
_NOT_ABBREVIATION = r"(?<!\b[A-Z]\.)(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bNo\.)"
_BOUNDARY = re.compile(  # after . ! ? (perhaps a closing quote) before a capital, digit or quote; blank lines
    rf"(?:(?<=[.!?]){_NOT_ABBREVIATION}|(?<=[.!?][\"'\u201d\u2019)\]]))\s+(?=[A-Z0-9\"'\u201c\u2018(\[])|\n[ \t]*\n\s*")
_ADJECTIVES = ("sticky ancient brave calm clever curious damp eager fancy fierce gentle gloomy grumpy happy "
               "hollow humble icy jolly lazy lively lucky mellow mighty nervous noisy odd polite proud quiet "
               "rapid rusty shiny silent smooth sour spicy swift tidy violet witty").split()
_NOUNS = ("breakfast anchor badger banjo basket beacon blanket canyon carpet castle cherry comet cottage "
          "dolphin engine falcon feather garden glacier harbor helmet island jacket kettle ladder lantern "
          "meadow mirror orchard otter pebble pillow pocket quilt river saddle teapot tunnel violin walrus").split()


@dataclass(frozen=True)
class Case:
    task: str
    length: int  # asked prompt length in tokens (prefix + context + suffix)
    depth: float  # asked depth in [0, 1] of the asked needle within the context
    index: int  # case number within its (length, depth) cell
    seed: int
    source: str  # where the haystack came from
    prefix: str  # chat template start (system + user turn) and the task instruction
    context: str  # the haystack with the needles inserted
    suffix: str  # question, end of the user turn, assistant header, answer opening
    references: tuple[str, ...]  # strings the answer must contain
    needles: tuple[str, ...]  # inserted needle statements as they appear in `context`; the asked one first
    max_new_tokens: int
    scorer: str  # "first_number" or "string_match_all"
    phrasing: str  # how instruction, needle and question are worded (one of PHRASINGS)
    # the questions after the first (multi-question cases; none otherwise), each (turn, references): `turn` asks it
    # after the previous question's answer (the chat template's end of the assistant's turn, the user's turn with the
    # question, the assistant's header and the answer opening; "\n\n" + question + opening without a template)
    follow_ups: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def prompt(self) -> str:
        return self.prefix + self.context + self.suffix

    @property
    def questions(self) -> int:
        """How many questions the case asks: the first (`suffix`) and its follow-ups."""
        return 1 + len(self.follow_ups)

    def references_of(self, question: int) -> tuple[str, ...]:
        """The references of question `question` (1-based: 1 is the first, `suffix`'s)."""
        if not 1 <= question <= self.questions:
            raise ValueError(f"question {question} of a case asking {self.questions}")
        return self.references if question == 1 else self.follow_ups[question - 2][1]

    @classmethod
    def from_dict(cls, fields: dict) -> "Case":
        """The case `dataclasses.asdict` gave (its tuples perhaps lists, after JSON)."""
        return cls(**{**fields, "references": tuple(fields["references"]), "needles": tuple(fields["needles"]),
                      "follow_ups": tuple((turn, tuple(refs)) for turn, refs in fields.get("follow_ups", ()))})


def first_number_match(answer: str, reference: str) -> float:
    """1.0 iff the first integer (a maximal run of digits) in `answer` equals `reference`."""
    found = re.search(r"\d+", answer)
    return float(found is not None and found.group() == reference)


def string_match_all(answer: str, references: Sequence[str]) -> float:
    """Share of `references` found as case-insensitive substrings of `answer` (RULER's string_match_all)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    low = answer.lower()
    return sum(r.lower() in low for r in references) / len(references)


def score(case: Case, answer: str, question: int = 1) -> float:
    """The case's score of `answer` to its question `question` (1-based; its references), in [0, 1]."""
    references = case.references_of(question)
    if case.scorer == "first_number":
        return first_number_match(answer, references[0])
    if case.scorer == "string_match_all":
        return string_match_all(answer, references)
    raise ValueError(f"unknown scorer {case.scorer!r}")


def case_token_ids(tokenizer, case: Case) -> tuple[list[int], list[int], list[int]]:
    """(prefix ids, context ids, suffix ids), each part tokenized on its own without added special tokens; the
    prefix starts with the BOS token where the tokenizer itself starts every text with it (Gemma)."""
    prefix, context, suffix = (_ids(tokenizer, part) for part in (case.prefix, case.context, case.suffix))
    if adds_bos(tokenizer) and prefix[:1] != [tokenizer.bos_token_id]:
        prefix = [tokenizer.bos_token_id] + prefix
    return prefix, context, suffix


def answer_positions(tokenizer, case: Case, prefix_tokens: int, question: int = 1) -> list[int] | None:
    """Positions, within the prompt's ids (`prefix_tokens` of prefix before the context), of the context tokens that
    spell an answer (a reference of question `question`, 1-based) inside a needle statement: the tokens a cache must
    hold for the answer to be read from it. None where the tokenizer gives no character offsets (a slow tokenizer)."""
    references = case.references_of(question)
    try:
        enc = tokenizer(case.context, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None
    spans = []
    for needle in case.needles:
        for start in (m.start() for m in re.finditer(re.escape(needle), case.context)):
            spans += [(start + m.start(), start + m.end()) for ref in references
                      for m in re.finditer(re.escape(ref), needle)]
    positions = [prefix_tokens + i for i, (a, b) in enumerate(enc["offset_mapping"])
                 if any(a < e and b > s for s, e in spans)]
    return positions or None


def turn_token_ids(tokenizer, case: Case) -> list[list[int]]:
    """The ids of each follow-up's turn (`Case.follow_ups`), each tokenized on its own without added special tokens."""
    return [_ids(tokenizer, turn) for turn, _ in case.follow_ups]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _Avoid:
    """Draws strings that occur nowhere in the given texts nor inside/around one another (case-insensitive)."""

    def __init__(self, *texts: str):
        self.text, self.used = "\n".join(texts).lower(), []

    def draw(self, rng: random.Random, make: Callable[[random.Random], str]) -> str:
        for _ in range(10_000):
            s = make(rng)
            low = s.lower()
            if low not in self.text and all(low not in u and u not in low for u in self.used):
                self.used.append(low)
                return s
        raise RuntimeError("could not draw a string absent from the haystack")


def _digits(n: int) -> Callable[[random.Random], str]:
    return lambda rng: str(rng.randint(10 ** (n - 1), 10 ** n - 1))


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=5))


# Phrasings: the same draws (haystack window, keys, values, depths) told three ways. "completion" gives the answer's
# opening (RULER's templates) and the model completes it; "restate" gives none, so the model answers in its own
# words and commonly restates the question first; "answer-only" asks for the bare answer. Instruction, needle and
# question all change with the phrasing; {n}, {key}, {value}, {name}, {previous}, {count} are filled per case.
PHRASINGS = ("answer-only", "restate", "completion")
DEFAULT_PHRASING = {"passkey": "restate", "niah_multikey": "completion", "niah_multivalue": "completion",
                    "kv_retrieval": "completion", "variable_tracking": "completion"}
# how a case is fed (h2o.eval.answers): the whole prompt in one forward, or the context in chunks, then the question;
# or several questions of one context: each from its own fork of the compressed first prompt, or in turn in one
# conversation (the cases' `follow_ups`)
SINGLE_PROTOCOLS = ("question-aware", "streaming")
MULTI_PROTOCOLS = ("multi-question", "multi-turn")
PROTOCOLS = SINGLE_PROTOCOLS + MULTI_PROTOCOLS
DEFAULT_QUESTIONS = 4  # questions per context under the multi-question protocols (niah_multikey: RULER's 4 keys)
MULTI_QUESTION_TASKS = ("niah_multikey", "kv_retrieval")  # tasks whose context holds several needles to ask
ONE_QUESTION = {"passkey": "its context hides one pass key",
                "niah_multivalue": "its one key's values are asked together, in one question",
                "variable_tracking": "its one chain is asked as a whole, in one question"}
_RULER_KEY = "One of the special magic numbers for {key} is: {value}."
TEXTS = {
    "passkey": {
        "restate": dict(  # landmark attention's prompt (llama/run_test.py)
            instruction="There is an important piece of information hidden inside a lot of irrelevant text. Find it "
                        "and memorize it. I will quiz you about the important information there.",
            needle="The pass key is {n}. Remember it. {n} is the pass key.",
            question="What is the pass key?", opening=""),
        "answer-only": dict(
            instruction="A pass key, a five-digit number, is hidden somewhere in the text below. Find it and keep it "
                        "in mind.",
            needle="Here is the pass key: {n}. Keep it in mind.",
            question="What is the pass key? Answer with the number only.", opening=""),
        "completion": dict(
            instruction="Read the following text carefully. Somewhere in it is a pass key that you will be asked "
                        "to repeat afterwards.",
            needle="Remember this pass key: {n}. The pass key is {n}.",
            question="What is the pass key mentioned in the text?", opening="The pass key is"),
    },
    "niah_multikey": {
        "completion": dict(  # RULER niah_multikey_1
            instruction="A special magic number is hidden within the following text. Make sure to memorize it. I "
                        "will quiz you about the number afterwards.",
            needle=_RULER_KEY,
            question="What is the special magic number for {key} mentioned in the provided text?",
            opening="The special magic number for {key} mentioned in the provided text is"),
        "restate": dict(
            instruction="Several numbers, each tied to a name, are hidden in the following text. Memorize them: I "
                        "will ask about one of them afterwards.",
            needle="The number of {key} is {value}.",
            question="Which number belongs to {key}?", opening=""),
        "answer-only": dict(
            instruction="The text below hides a few secret codes, each with its own label. Remember every one.",
            needle="Secret code for {key}: {value}.",
            question="What is the secret code for {key}? Answer with the number only.", opening=""),
    },
    "niah_multivalue": {
        "completion": dict(  # RULER niah_multivalue
            instruction="Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                        "I will quiz you about the numbers afterwards.",
            needle=_RULER_KEY,
            question="What are all the special magic numbers for {key} mentioned in the provided text?",
            opening="The special magic numbers for {key} mentioned in the provided text are"),
        "restate": dict(
            instruction="Several numbers tied to one name are hidden in the following text. Memorize them: I will "
                        "ask for them afterwards.",
            needle="One number of {key} is {value}.",
            question="Which numbers belong to {key}?", opening=""),
        "answer-only": dict(
            instruction="The text below hides several secret codes that share one label. Remember every one.",
            needle="A secret code for {key}: {value}.",
            question="What are all the secret codes for {key}? Answer with the numbers only, separated by commas.",
            opening=""),
    },
    "kv_retrieval": {
        "completion": dict(  # Lost in the Middle, kv_retrieval.prompt
            instruction="Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:",
            question='Key: "{key}"\nCorresponding value:', opening='"'),
        "restate": dict(
            instruction="Below is a JSON object that maps keys to values. I will ask for the value of one key.\n\n"
                        "JSON object:",
            question='Which value does the key "{key}" map to?', opening=""),
        "answer-only": dict(
            instruction="Look up a key in the JSON object below.\n\nJSON:",
            question='What is the value of the key "{key}"? Answer with the value only.', opening=""),
    },
    "variable_tracking": {
        "completion": dict(  # RULER vt
            instruction="Memorize and track the chain(s) of variable assignment hidden in the following text.",
            needle="VAR {name} = {value}.", link="VAR {name} = VAR {previous}.",
            question="Question: Find all variables that are assigned the value {value} in the text above.",
            opening="Answer: According to the chain(s) of variable assignment in the text above, {count} variables "
                    "are assigned the value {value}, they are:"),
        "restate": dict(
            instruction="The following text hides a chain of assignments between variables. Follow it.",
            needle="Let {name} be {value}.", link="Let {name} be {previous}.",
            question="Which variables end up holding the value {value}?", opening=""),
        "answer-only": dict(
            instruction="Track the variable assignments hidden in the following text.",
            needle="{name} := {value}.", link="{name} := {previous}.",
            question="List every variable whose value is {value}. Answer with the variable names only, separated "
                     "by commas.", opening=""),
    },
}


def _phrased(task: str, phrasing: str) -> dict:
    return TEXTS[task][phrasing]


def _spec(task: str, rng: random.Random, avoid: _Avoid, depth: float, opts: dict, phrasing: str) -> dict:
    """The task's instruction, question, answer opening, needles, their depths and references. The draws (and so
    the haystack window, keys, values and depths) do not depend on the phrasing."""
    t = _phrased(task, phrasing)
    if task == "passkey":
        n = avoid.draw(rng, _digits(5))
        return dict(instruction=t["instruction"], question=t["question"], opening=t["opening"], references=[n],
                    depths=[depth], needles=[t["needle"].format(n=n)])
    if task == "niah_multikey":
        keys = [avoid.draw(rng, _word_key) for _ in range(opts["num_keys"])]
        values = [avoid.draw(rng, _digits(7)) for _ in keys]
        return dict(instruction=t["instruction"], question=t["question"].format(key=keys[0]),
                    opening=t["opening"].format(key=keys[0]),
                    needles=[t["needle"].format(key=k, value=v) for k, v in zip(keys, values)], references=values[:1],
                    depths=[depth] + [rng.random() for _ in keys[1:]],
                    asks=[(t["question"].format(key=k), t["opening"].format(key=k), (v,))
                          for k, v in zip(keys, values)])
    if task == "niah_multivalue":
        key = avoid.draw(rng, _word_key)
        values = [avoid.draw(rng, _digits(7)) for _ in range(opts["num_values"])]
        return dict(instruction=t["instruction"], question=t["question"].format(key=key),
                    opening=t["opening"].format(key=key),
                    needles=[t["needle"].format(key=key, value=v) for v in values], references=values,
                    depths=[depth] + [rng.random() for _ in values[1:]])
    if task == "variable_tracking":
        hops = opts["num_hops"]
        value = avoid.draw(rng, _digits(5))
        fill = dict(value=value, count=hops + 1)
        for every in TEXTS[task].values():  # names avoid every phrasing's text: the same draws for each
            avoid.text += "\n" + (every["question"] + every["opening"] + every["needle"] + every["link"]).format(
                name="", previous="", **fill).lower()
        names = [avoid.draw(rng, _var_name) for _ in range(hops + 1)]
        return dict(instruction=t["instruction"], question=t["question"].format(**fill),
                    opening=t["opening"].format(**fill), references=names,
                    needles=[t["needle"].format(name=names[0], value=value)] +
                            [t["link"].format(name=b, previous=a) for a, b in zip(names, names[1:])],
                    depths=[depth] + sorted(rng.uniform(depth, 1.0) for _ in range(hops)))
    raise AssertionError(task)


def _frame(tokenizer, instruction: str, question: str, opening: str, sep: str = "\n\n") -> tuple[str, str]:
    """(prefix, suffix) around the context: the chat template split at a marker, or a plain completion."""
    if getattr(tokenizer, "chat_template", None):
        content = instruction + sep + _MARK + "\n\n" + question
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        prefix, suffix = text.split(_MARK)
        return prefix, suffix + opening
    return instruction + sep, "\n\n" + question + (" " + opening if opening else "")


def _turn(tokenizer, question: str, opening: str) -> str:
    """The text that asks `question` after an answer: with a chat template, the end of the assistant's turn, the
    user's turn with the question and the assistant's header (the template's own rendering of a conversation
    [user, assistant, user], cut after the assistant's message), then the answer opening; without one, a plain
    completion's "\n\n" + question + " " + opening."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK},
                                              {"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        if not isinstance(text, str) or text.count(_MARK) != 1:
            raise ValueError("a follow-up question is asked after the assistant's answer in the tokenizer's chat "
                             "template, but this template does not reproduce the assistant's message, so the turn "
                             "cannot be cut from it")
        return text.split(_MARK)[1] + opening
    return "\n\n" + question + (" " + opening if opening else "")


def _spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the text's sentences (split after . ! ? and at blank lines), whitespace trimmed."""
    spans, start = [], 0
    for m in [*_BOUNDARY.finditer(text), None]:
        end = len(text) if m is None else m.start()
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
        if m is not None:
            start = m.end()
    return spans


def _sentences(text: str) -> list[str]:
    """The text's sentences, each with its whitespace runs collapsed to single spaces."""
    return [" ".join(text[a:b].split()) for a, b in _spans(text)]


def _boundary(counts: Sequence[int], depth: float) -> int:
    """The sentence boundary (0..len(counts)) whose share of tokens before it is nearest `depth`."""
    total, before, best, best_err = max(sum(counts), 1), 0, 0, 2.0
    for b in range(len(counts) + 1):
        err = abs(before / total - depth)
        if err < best_err:
            best, best_err = b, err
        before += counts[b] if b < len(counts) else 0
    return best


def _fit(length: int, measure: Callable[[int, int], int], n_max: int, start: int,
         words: Callable[[int], int]) -> tuple[int, int]:
    """(m whole units, k words of unit m) whose measured total is nearest `length`."""
    m = start
    while m > 0 and measure(m, 0) > length:
        m -= 1
    while m < n_max and measure(m + 1, 0) <= length:
        m += 1
    if m >= n_max:
        raise ValueError(f"the haystack ran out before reaching {length} tokens")
    lo, hi = measure(m, 0), measure(m + 1, 0)
    if min(length - lo, hi - length) <= _FINE * length or words(m) <= 1:
        return (m, 0) if length - lo <= hi - length else (m + 1, 0)
    a, b = 0, words(m)  # largest k with measure(m, k) <= length lies in [a, b)
    while b - a > 1:
        k = (a + b) // 2
        a, b = (k, b) if measure(m, k) <= length else (a, k)
    return (m, a) if length - measure(m, a) <= measure(m, a + 1) - length else (m, a + 1)


def _haystack_case(tokenizer, rng, length, depth, name, text, spans, opts, task, phrasing):
    need = length * _CHARS_PER_TOKEN
    starts = [i for i, (a, _) in enumerate(spans) if a <= len(text) - need] or [0]
    first = starts[rng.randrange(len(starts))]
    window: list[str] = []
    counts: list[int] = []
    while first + len(window) < len(spans) and sum(counts) < 1.2 * length + 64:  # a window of enough tokens
        more, chars = [], 0
        while first + len(window) + len(more) < len(spans) and chars < need:
            a, b = spans[first + len(window) + len(more)]
            more.append(" ".join(text[a:b].split()))
            chars += b - a
        counts += [len(x) for x in tokenizer([" " + s for s in more], add_special_tokens=False)["input_ids"]]
        window += more
    scaffold = _frame(tokenizer, "", "", "")
    spec = _spec(task, rng, _Avoid(*window, *scaffold), depth, opts, phrasing)
    prefix, suffix = _frame(tokenizer, spec["instruction"], spec["question"], spec["opening"])
    fixed = len(_ids(tokenizer, prefix)) + len(_ids(tokenizer, suffix))
    needle_tokens = sum(len(_ids(tokenizer, " " + n)) for n in spec["needles"])
    room = length - fixed - needle_tokens
    if room < _MIN_CONTEXT:
        raise ValueError(f"length {length} is too short for {task}: its prompt frame, question and needles "
                         f"take {fixed + needle_tokens} tokens, leaving {room} (< {_MIN_CONTEXT}) for the haystack")
    cache: dict[tuple[int, int], tuple[str, int]] = {}

    def render(m: int, k: int) -> tuple[str, int]:
        if (m, k) not in cache:
            units, ucounts = window[:m], counts[:m]
            if k:
                units = units + [" ".join(window[m].split(" ")[:k])]
                ucounts = ucounts + [len(_ids(tokenizer, " " + units[-1]))]
            at = [_boundary(ucounts, d) for d in spec["depths"]]
            pieces = []
            for b in range(len(units) + 1):
                pieces += [n for n, nb in zip(spec["needles"], at) if nb == b] + units[b:b + 1]
            context = " ".join(pieces)
            cache[m, k] = context, fixed + len(_ids(tokenizer, context))
        return cache[m, k]

    guess, acc = 0, 0
    while guess < len(counts) and acc + counts[guess] <= room:
        acc, guess = acc + counts[guess], guess + 1
    try:
        m, k = _fit(length, lambda m, k: render(m, k)[1], len(window) - 1, guess,
                    lambda m: len(window[m].split(" ")))
    except ValueError:
        raise ValueError(f"haystack {name!r} is too short for length {length}") from None
    a = spans[first][0]
    b = spans[first + m - 1][1] if m else a
    if k:
        ends = [w.end() for w in re.finditer(r"\S+", text[spans[first + m][0]:spans[first + m][1]])]
        b = spans[first + m][0] + ends[k - 1]
    return render(m, k)[0], prefix, suffix, spec, f"{name} chars {a}-{b}"


def _kv_line(pair: tuple[str, str], i: int, n: int) -> str:
    return ("{" if i == 0 else " ") + f'"{pair[0]}": "{pair[1]}"' + (",\n" if i < n - 1 else "}")


def _kv_case(tokenizer, rng, length, depth, phrasing, questions=1):
    def new_uuid(r: random.Random) -> str:
        return str(uuid.UUID(int=r.getrandbits(128), version=4))

    avoid = _Avoid(*_frame(tokenizer, "", "", ""))
    key, value = avoid.draw(rng, new_uuid), avoid.draw(rng, new_uuid)
    t = _phrased("kv_retrieval", phrasing)
    prefix, suffix = _frame(tokenizer, t["instruction"], t["question"].format(key=key), t["opening"], sep="\n")
    fixed = len(_ids(tokenizer, prefix)) + len(_ids(tokenizer, suffix))
    fillers: list[tuple[str, str]] = []

    def pairs(n: int) -> list[tuple[str, str]]:
        while len(fillers) < n - 1:
            fillers.append((avoid.draw(rng, new_uuid), avoid.draw(rng, new_uuid)))
        at = round(depth * (n - 1))
        return fillers[:at] + [(key, value)] + fillers[at:n - 1]

    def render(n: int) -> tuple[str, int]:
        context = "".join(_kv_line(p, i, n) for i, p in enumerate(pairs(n)))
        return context, fixed + len(_ids(tokenizer, context))

    per = len(_ids(tokenizer, _kv_line((key, value), 1, 3)))
    if length - fixed < 2 * per:
        raise ValueError(f"length {length} is too short for kv_retrieval: its prompt frame takes {fixed} tokens "
                         f"and two key-value pairs (the fewest it takes) {2 * per} more")
    n, _ = _fit(length, lambda m, k: render(max(m, 2))[1], 1 << 30, max((length - fixed) // per, 2), lambda m: 0)
    n = max(n, 2)
    err = render(n)[1] - length
    for _ in range(3):  # redraw filler pairs: UUIDs vary by a few tokens each, enough to close the gap
        if abs(err) <= _FINE * length:
            break
        for _ in range(64):
            j = rng.randrange(n - 1)
            old, new = fillers[j], (avoid.draw(rng, new_uuid), avoid.draw(rng, new_uuid))
            delta = len(_ids(tokenizer, _kv_line(new, 1, 3))) - len(_ids(tokenizer, _kv_line(old, 1, 3)))
            if abs(err + delta) < abs(err):
                fillers[j], err = new, err + delta
        err = render(n)[1] - length
    context = render(n)[0]
    asks = [(t["question"].format(key=key), t["opening"], (value,), f'"{key}": "{value}"')]
    if questions > 1:  # more pairs asked: filler pairs of the context, drawn after the fit (the context is the same)
        if n - 1 < questions - 1:
            raise ValueError(f"length {length} is too short for {questions} questions of kv_retrieval: its JSON "
                             f"object holds {n} pairs")
        for j in rng.sample(range(n - 1), questions - 1):
            k, v = fillers[j]
            asks.append((t["question"].format(key=k), t["opening"], (v,), f'"{k}": "{v}"'))
    return context, prefix, suffix, asks


def generate_cases(task: str, tokenizer, haystacks: dict[str, str], lengths: list[int], depths: list[float],
                   cases: int, seed: int, phrasing: str | None = None, questions: int = 1,
                   **task_options) -> list[Case]:
    """`cases` cases per (length, depth) cell, ordered by length, then depth, then index; deterministic for a seed.

    Each case draws from its own random.Random seeded with "seed/task/length/depth/index": a haystack (by
    name), a sentence-aligned start in it, the needles' keys and values. The phrasing (one of `PHRASINGS`;
    default the task's `DEFAULT_PHRASING`) changes only the words around those draws: the same seed gives the
    same haystack start, needles' values and asked depths in every phrasing. task_options: num_keys (niah_multikey),
    num_values (niah_multivalue), num_hops (variable_tracking).

    questions > 1 (the multi-question protocols; tasks in `MULTI_QUESTION_TASKS`): each case also asks
    `questions - 1` follow-ups of its context (`Case.follow_ups`). niah_multikey asks every key in the order drawn,
    the first at the asked depth (at least `questions` keys: num_keys is raised to it); kv_retrieval asks its pair at
    the asked depth, then `questions - 1` other pairs of the object, drawn after the context is fitted. Up to the
    follow-ups, a case is the one `questions=1` gives (the same context, prompt and first question; niah_multikey
    with more than 4 questions has more keys).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    phrasing = DEFAULT_PHRASING[task] if phrasing is None else phrasing
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing {phrasing!r}; phrasings: {', '.join(PHRASINGS)}")
    unknown = set(task_options) - set(OPTIONS[task])
    if unknown:
        raise ValueError(f"{task} takes no option(s) {sorted(unknown)}; it takes {sorted(OPTIONS[task]) or 'none'}")
    if isinstance(questions, bool) or not isinstance(questions, int) or questions < 1:
        raise ValueError(f"questions must be a positive integer, got {questions!r}")
    if questions > 1 and task not in MULTI_QUESTION_TASKS:
        raise ValueError(f"{task} asks one question of a context ({ONE_QUESTION[task]}); the tasks that ask several: "
                         f"{', '.join(MULTI_QUESTION_TASKS)}")
    opts = {**OPTIONS[task], **task_options}
    for name, v in opts.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if task == "niah_multikey" and questions > opts["num_keys"]:
        if "num_keys" in task_options:
            raise ValueError(f"{questions} questions need as many keys; num_keys is {opts['num_keys']}")
        opts["num_keys"] = questions
    if isinstance(cases, bool) or not isinstance(cases, int) or cases < 1:
        raise ValueError(f"cases must be a positive integer, got {cases!r}")
    if not lengths or not depths:
        raise ValueError("lengths and depths must be non-empty lists")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth {d!r} is outside [0, 1]")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive integer, got {length!r}")
    names = sorted(haystacks)
    spans: dict[str, list[tuple[int, int]]] = {}
    if task != "kv_retrieval":
        if not names or not any(t.strip() for t in haystacks.values()):
            raise ValueError(f"{task} needs at least one non-empty haystack text")
        for name in names:
            text = haystacks[name]
            if len(text) < max(lengths) * _CHARS_PER_TOKEN:  # short enough to count its tokens
                n = len(_ids(tokenizer, " ".join(text.split())))
                if n < max(lengths):
                    raise ValueError(f"haystack {name!r} is too short for length {max(lengths)}: it has {n} tokens")
            spans[name] = _spans(text)
    out = []
    for length in lengths:
        for depth in depths:
            for index in range(cases):
                rng = random.Random(f"{seed}/{task}/{length}/{depth!r}/{index}")
                if task == "kv_retrieval":
                    context, prefix, suffix, asks = _kv_case(tokenizer, rng, length, depth, phrasing, questions)
                    needles = tuple(needle for *_, needle in asks)  # the asked pairs, the first one first
                    refs, source = asks[0][2], "random UUID pairs"
                else:
                    name = names[rng.randrange(len(names))]
                    context, prefix, suffix, spec, source = _haystack_case(
                        tokenizer, rng, length, depth, name, haystacks[name], spans[name], opts, task, phrasing)
                    needles, refs, asks = tuple(spec["needles"]), tuple(spec["references"]), spec.get("asks", [])
                follow_ups = tuple((_turn(tokenizer, question, opening), tuple(references))
                                   for question, opening, references, *_ in asks[1:questions])
                out.append(Case(task=task, length=length, depth=depth, index=index, seed=seed, source=source,
                                prefix=prefix, context=context, suffix=suffix, references=refs, needles=needles,
                                max_new_tokens=max_new_tokens(task, phrasing), phrasing=phrasing,
                                scorer="first_number" if task == "passkey" else "string_match_all",
                                follow_ups=follow_ups))
    return out
