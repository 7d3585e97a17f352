"""The options of the `h2o` commands: those every command shares (`add_shared_options`) and each command's own (one
function per command, named as it: `bench(parser)`, `tasks(parser)`, ...).

Nothing here imports torch, transformers, datasets or matplotlib, nor a command's module: `h2o <command> --help`
and argparse's own refusals (an unknown option, a bad value) answer at once; the command's module is imported only
to run it (`h2o.eval.cli`). The few names the help shows whose source imports torch are copied here, each held equal
to its source by a test (tests/test_cli_fast.py): the built-in models, H2O's default scoring rule. The rule families and
allocations come from `h2o.names`' table, generated from the registry; names are checked there too, without torch
(sweep's --rules here, the commands' policy names in `h2o.eval.cli.name_refusal`).

One vocabulary (issue 42): one option name per concept, with one meaning wherever it appears (the table and its
deliberate differences: tests/test_vocabulary.py). A renamed option keeps its old name one release as a deprecated
alias (`DEPRECATED`, added by `add_aliases`): it parses to the new option's destination and prints one line on
stderr naming the new option.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

from h2o import names

from . import data, retrieval, units
from .head_score_cache import CALIBRATION_BOOK, DEFAULTS as HEAD_SCORE_DEFAULTS

# checkpoints.list_models(), the embedded model (checkpoints.EMBEDDED, the default) first
MODELS = ("smollm2-135m", "gemma3-270m", "random:pythia-160m", "random:pythia-410m", "random:pythia-1.4b",
          "random:pythia-2.8b", "random:llama-1b", "random:smollm2-135m", "random:tiny-gpt-neox", "random:tiny-llama")
# h2o.policies.families(): the built-in rule families (h2o.names' table, generated from the registry)
FAMILIES = names.table().families
DEFAULT_SCORE = "mean"  # h2o.DEFAULT_SCORE
MIN_BUDGET = 8  # 4 sinks plus a window: the smallest budget a family is sized to (h2o.at_budget)


def budget(text: str) -> int:
    """argparse type of every command's budgets (--budgets, --throughput-budget): one message everywhere."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < MIN_BUDGET:
        raise argparse.ArgumentTypeError(f"a budget is a whole number of tokens >= {MIN_BUDGET} (4 sinks plus a "
                                         f"window), got {text!r}")
    return value


# the built-in allocations (h2o.policies.allocation.registered_allocations(), in h2o.names' table)
ALLOCATIONS = tuple(names.table().allocations)

# bench: with the allocation that kept the most needles at the same bytes (docs/head-budgets.md): retrieval heads. A
# random-weight model has no tokenizer, so no retrieval score: its default ranks the heads by induction instead.
BENCH_PROTOCOLS = ("question-aware", "streaming")  # the single-question protocols: one kept column each
BENCH_POLICIES = ["full", "streaming_4_252", "h2o_4_32_256", "retrieval_0.1_4+h2o_4_32_256", "streaming_4_508",
                  "h2o_4_64_512"]
RANDOM_MODEL_ALLOCATION = "induction_0.1_4+h2o_4_32_256"
# stress: the checkpoint lengths unless --lengths is given
CPU_LENGTHS = [1024, 2048, 4096, 8192, 16384]
CUDA_LENGTHS = CPU_LENGTHS + [32768]
# sweep: the throughput part's defaults per device kind
MAX_BATCH = {"cpu": 8, "cuda": 1024}
DEFAULT_CONTEXT = {"cpu": 512, "cuda": 1024}
DEFAULT_NEW_TOKENS = {"cpu": 8, "cuda": 32}


# --- shared by every command ------------------------------------------------------------------------------------

def add_shared_options(p: argparse.ArgumentParser, model: bool = True, command: str | None = None) -> None:
    """The options every command shares; a command that runs no model (`model=False`) gets the output ones only,
    and a command leaves out those it would ignore (`NOT_TAKEN`)."""
    if model:
        _add_model_options(p, NOT_TAKEN.get(command, ()))
    g = p.add_argument_group("output")
    g.add_argument("--out", default="results", help="output directory")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


# the shared options a command would ignore, left out of its parser (issue 42: an option that does nothing is not
# offered): heatmap runs eager attention (output_attentions needs it) over the full text, no cache; heads runs its own
# probe attention on its own framing (random tokens, chat-framed needles: no BOS of ours), no cache
NOT_TAKEN = {"heatmap": ("--attn", "--positions", "--buffer", "--score"),
             "heads": ("--attn", "--bos", "--positions", "--buffer", "--score"),
             "surrogate": ("--attn", "--bos", "--positions", "--buffer", "--score")}


def _add_model_options(p: argparse.ArgumentParser, leave_out=()) -> None:
    def add(group, name, **kwargs):
        if name not in leave_out:
            group.add_argument(name, **kwargs)

    g = p.add_argument_group("model and data")
    add(g, "--model", default=MODELS[0], help=f"built-in name ({', '.join(MODELS)}), hub id or local directory")
    device = default_device()
    add(g, "--device", default=device,
        help=f"cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu; here {device})")
    add(g, "--dtype", default=None,
        help="float32 | float16 | bfloat16 (or fp32, fp16, bf16): weights and activations "
             "(default: float32 on CPU, float16 on CUDA)")
    add(g, "--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    add(g, "--device-map", default=None,
        help='passed to accelerate, e.g. "auto" for multi-GPU models (default: none, the whole model on --device)')
    add(g, "--data-dir", default=None, help="local corpora (default: $H2O_DATA_DIR, ../shared/data, else the hub)")
    add(g, "--bos", action=argparse.BooleanOptionalAction, default=None,
        help="prepend (--bos) or not (--no-bos) the tokenizer's BOS token to every text; default: as the "
             "tokenizer itself does (Gemma: yes, SmolLM2: no)")
    add(g, "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    if all(name in leave_out for name in ("--positions", "--buffer", "--score")):
        return
    g = p.add_argument_group("cache")
    add(g, "--positions", default="original", choices=["original", "reindex"],
        help="original: every kept key keeps its absolute position (stay within the model's trained "
             "context); reindex: positions are cache slots, keys re-rotated after eviction "
             "(StreamingLLM; streams past the trained context)")
    add(g, "--buffer", type=int, default=64,
        help="lazy eviction slack: a layer is cut back to its budget once it holds more than budget "
             "+ buffer tokens (0 = evict every step)")
    add(g, "--score", default=None, choices=["mean", "sum"],
        help=f"H2O scoring rule for names without one (default: h2o.DEFAULT_SCORE = {DEFAULT_SCORE})")


def default_device() -> str:
    """--device's default: "cuda" when torch sees a GPU, else "cpu". Torch's own answer wherever torch is imported
    (a run parses its arguments again once it is: `h2o.eval.cli.main`); before that (`--help`, argparse's
    refusals) a guess that imports nothing, `_gpu_guess`."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if _gpu_guess() else "cpu"


def _gpu_guess() -> bool:
    """Whether torch would see a GPU, asked without importing it: a CUDA (or ROCm) build of torch, no
    CUDA_VISIBLE_DEVICES that hides every device, and a GPU device node (nvidia-smi on a system without /dev)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False
    try:
        version = (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return False
    if not re.search(r"^(cuda|hip)\b[^=\n]*=\s*['\"]", version, re.MULTILINE):  # cuda = None: a CPU build
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    if os.path.isdir("/dev"):
        return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")
    return shutil.which("nvidia-smi") is not None


# the text options, one meaning in every command: --corpus names the corpus (or corpora, where a command reads
# several), --pg19-book the PG-19 book(s) of --corpus pg19, --text-file a UTF-8 file read INSTEAD of them
TEXT_FILE_HELP = "read this UTF-8 text file instead of --corpus and --pg19-book"


def add_text_options(p: argparse.ArgumentParser, corpus: str) -> None:
    """--corpus / --pg19-book / --text-file, for commands that read one text."""
    p.add_argument("--corpus", default=corpus, choices=list(data.CORPORA),
                   help="corpus of the text (pretrained models; random-weight models are fed random ids)")
    p.add_argument("--pg19-book", default=data.PG19_FIRST_BOOK,
                   help="PG-19 test book id (Gutenberg id; used with --corpus pg19)")
    p.add_argument("--text-file", default=None, help=TEXT_FILE_HELP)


def streaming_policy(text: str) -> str:
    """argparse type of perf's --streaming: a StreamingLLM policy, as its name says (the ratios are over it)."""
    if not re.fullmatch(r"streaming_\d+_\d+", text):
        raise argparse.ArgumentTypeError(f"a StreamingLLM policy, streaming_<sinks>_<window> (e.g. streaming_4_252), "
                                         f"got {text!r}")
    return text


# --- deprecated aliases: old names kept one release -------------------------------------------------------------

# command -> {old name: new name}; each old name parses to its new option's destination and prints one line on
# stderr that names the new option
DEPRECATED = {
    "bench": {"--corpora": "--corpus", "--text-file": "--add-text-file", "--chunk": "--ppl-chunk",
              "--passkey-cases": "--cases", "--passkey-length": "--lengths"},
    "tasks": {"--corpora": "--corpus", "--pg19-books": "--pg19-book", "--chunk": "--context-chunk"},
    "stress": {"--chunk": "--context-chunk"},
    "sweep": {"--families": "--rules", "--chunk": "--ppl-chunk", "--passkey-cases": "--cases",
              "--passkey-length": "--lengths"},
    "perf": {"--h2o": "--policy", "--prompt": "--context", "--steps": "--decode-steps"},
    "heads": {"--repeats": "--random-sequences"},
}
# why, where the new name is not a plain rename
DEPRECATION_NOTES = {
    ("bench", "--text-file"): "in every other command --text-file reads a file instead of --corpus",
    ("perf", "--h2o"): "it times any evicting policy, not only H2O's",
}
_quiet = False


def deprecation(command: str, old: str, new: str) -> str:
    """The one line a deprecated alias prints on stderr."""
    note = DEPRECATION_NOTES.get((command, old))
    return (f"h2o {command}: warning: {old} is deprecated and will be removed in the next release: use {new}"
            + (f" ({note})" if note else ""))


class DeprecatedAlias(argparse.Action):
    """An old option name kept one release: stores into its new option's destination, as the new option does, and
    prints `deprecation` on stderr."""

    def __init__(self, option_strings, dest, command: str, new: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.command, self.new = command, new

    def __call__(self, parser, namespace, values, option_string=None):
        if not _quiet:
            print(deprecation(self.command, option_string, self.new), file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_aliases(p: argparse.ArgumentParser, command: str) -> None:
    """The command's deprecated aliases (`DEPRECATED`), each parsed as its new option (same destination, type,
    number of values and choices), hidden from the help, which names it beside the new option."""
    for old, new in DEPRECATED.get(command, {}).items():
        target = p._option_string_actions.get(new)
        if target is None:
            raise ValueError(f"h2o {command}: {old} is a deprecated alias of {new}, which h2o {command} does not offer")
        if type(target) is not argparse._StoreAction:  # every renamed option stores its value(s)
            raise TypeError(f"h2o {command} {new}: an alias needs an option that stores its value(s)")
        p.add_argument(old, action=DeprecatedAlias, command=command, new=new, dest=target.dest, nargs=target.nargs,
                       type=target.type, choices=target.choices, metavar=target.metavar, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
        target.help += f" (formerly {old}, deprecated)"


@contextlib.contextmanager
def quiet_aliases():
    """No deprecation lines while the arguments are parsed again (`h2o.eval.cli.main` parses twice)."""
    global _quiet
    before, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = before


# --- each command's own, in the order of `h2o --help` ---------------------------------------------------------------

def bench(p) -> None:
    p.add_argument("--policies", nargs="+", default=BENCH_POLICIES,
                   help=f"policy names (grammar below); 'full' (the baseline) is always run, first (default: "
                        f"{' '.join(BENCH_POLICIES)}; on a random-weight model {RANDOM_MODEL_ALLOCATION} for the "
                        "retrieval-heads allocation, which needs a tokenizer)")
    p.add_argument("--corpus", nargs="+", default=["wikitext", "pg19"], choices=list(data.CORPORA),
                   help="corpora whose PPL is measured (a column each; the haystacks of the retrieval columns); the "
                        "speed prompt is WikiText-2's start")
    p.add_argument("--pg19-book", default=data.PG19_FIRST_BOOK,
                   help="PG-19 test book id (Gutenberg id) of the pg19 column")
    p.add_argument("--add-text-file", default=None, metavar="TEXT_FILE",
                   help="also measure PPL on this UTF-8 text file: a column of its own beside --corpus's (unlike "
                        "--text-file elsewhere, which reads a file instead of --corpus)")
    p.add_argument("--ppl-tokens", type=int, default=2048, help="tokens scored per text")
    p.add_argument("--no-ppl", action="store_true", help="speed and memory only")
    p.add_argument("--ppl-mode", default="chunked", choices=["stream", "chunked"],
                   help="stream: token by token (StreamingLLM protocol); chunked: --ppl-chunk tokens per forward")
    p.add_argument("--ppl-chunk", type=int, default=32,
                   help="tokens per forward of the chunked PPL evaluation")
    p.add_argument("--context", type=int, default=2048, help="prompt tokens for the speed run")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per speed run")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repeats of the speed run (TPOT: median and min over them)")
    p.add_argument("--batch", type=int, default=1, help="rows in the speed run")
    p.add_argument("--tasks", nargs="+", default=["passkey"],
                   help="retrieval tasks with a kept column each (h2o tasks' names: passkey, niah_multikey, ...)")
    p.add_argument("--cases", type=int, default=10,
                   help="retrieval cases of the kept columns per task, phrasing and length (their depths spread over "
                        "0.1-0.9); 0 = none")
    p.add_argument("--lengths", nargs="+", type=int, default=[1280],
                   help="prompt lengths (tokens) of the retrieval cases")
    p.add_argument("--phrasings", nargs="+", default=list(retrieval.PHRASINGS), choices=retrieval.PHRASINGS,
                   help="wordings of the retrieval cases, crossed with them (the kept columns pool them)")
    p.add_argument("--protocols", nargs="+", default=["question-aware"], choices=BENCH_PROTOCOLS,
                   help="protocols of the kept columns, a column per task and protocol: question-aware (the whole "
                        "prompt in one forward, compressed after it) and streaming (the context fed --context-chunk "
                        "tokens per forward with eviction in force, then the question): h2o tasks --protocol")
    p.add_argument("--context-chunk", type=int, default=128,
                   help="tokens of the context fed per forward, eviction in force (--protocols streaming)")
    units.add_arguments(p)


def tasks(p) -> None:
    p.add_argument("--tasks", nargs="+", default=["passkey", "niah_multikey", "niah_multivalue"],
                   help=f"any of {', '.join(retrieval.TASKS)}")
    p.add_argument("--policies", nargs="+", default=["streaming", "h2o_mean"],
                   help=f"families ({', '.join(FAMILIES)}: sized by --budgets or --budget-ratio) or policy names (grammar below); "
                        "the full cache always runs as the control")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--budgets", nargs="+", type=budget, default=None, help="family budgets in tokens (default: unset; families are sized by --budget-ratio)")
    group.add_argument("--budget-ratio", nargs="+", type=float, default=[0.15, 0.3],
                       help="family budgets as shares of each case's length")
    p.add_argument("--lengths", nargs="+", type=int, default=[768], help="prompt lengths (tokens)")
    p.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7, 0.9],
                   help="needle depths in [0, 1]")
    p.add_argument("--cases", type=int, default=2, help="cases per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated cases (needles, keys, values)")
    p.add_argument("--phrasings", nargs="+", default=list(retrieval.PHRASINGS), choices=retrieval.PHRASINGS,
                   help="wordings of instruction, needle and question, crossed with the cases (the same draws in "
                        "each): answer-only asks for the bare answer, restate gives no answer opening (the model "
                        "answers in its own words), completion gives the opening; results per phrasing and pooled")
    p.add_argument("--protocol", default="question-aware", choices=retrieval.PROTOCOLS,
                   help="question-aware: the whole prompt, question included, in one forward, compressed "
                        "after it; streaming: the context fed --context-chunk tokens per forward with eviction in "
                        "force, then the question; multi-question: --questions needles of one context, the first "
                        "question's prompt compressed once, every question answered from its own fork of it; "
                        "multi-turn: the same questions in turn in one conversation, each answer kept in the cache "
                        f"(these two: tasks {', '.join(retrieval.MULTI_QUESTION_TASKS)}; results per question)")
    p.add_argument("--questions", type=int, default=retrieval.DEFAULT_QUESTIONS,
                   help="questions asked of each context under --protocol multi-question and multi-turn (at least "
                        "2): niah_multikey asks its keys (more keys when more are asked), kv_retrieval as many pairs "
                        "of its object; the other protocols ask one")
    p.add_argument("--context-chunk", type=int, default=128,
                   help="tokens of the context fed per forward, eviction in force (--protocol streaming)")
    p.add_argument("--min-solved", type=int, default=5,
                   help="fewest cases the full cache must solve for a task to be scored")
    p.add_argument("--corpus", nargs="+", default=["pg19", "wikitext"], choices=list(data.CORPORA),
                   help="corpora of the haystacks")
    p.add_argument("--pg19-book", nargs="+", default=["10146", "10321", "24553"],
                   help="PG-19 test book ids (Gutenberg ids) of the pg19 haystacks, one haystack each")
    p.add_argument("--text-file", default=None, help=TEXT_FILE_HELP + ": the haystacks are cut from it")
    units.add_arguments(p)


def stress(p) -> None:
    p.add_argument("--policies", nargs="+", default=["full", "streaming_4_252", "h2o_4_32_256"],
                   help="policy names (grammar below), run in lockstep")
    p.add_argument("--lengths", nargs="+", type=int, default=None,
                   help=f"checkpoint context lengths (default: {' '.join(map(str, CPU_LENGTHS))}; "
                        f"on CUDA also {CUDA_LENGTHS[-1]})")
    p.add_argument("--context-chunk", type=int, default=256,
                   help="tokens of the text fed per forward, eviction in force, between the checkpoints")
    p.add_argument("--decode-steps", type=int, default=8, help="timed single-token steps per policy per checkpoint")
    add_text_options(p, "pg19")


def sweep(p) -> None:
    parts = ("ppl", "throughput")
    p.add_argument("--parts", nargs="+", default=list(parts), choices=parts, help="what to measure")
    p.add_argument("--budgets", nargs="+", type=budget, default=[64, 128, 256, 512], help="cache budgets (tokens)")
    p.add_argument("--rules", nargs="+", default=["streaming", "h2o_mean", "h2o_sum"], type=rule_family, metavar="RULE",
                   help=f"rule families, each at every budget: 4 sinks, recent budget/8 (StreamingLLM: the rest is its "
                        f"window), e.g. streaming -> streaming_4_{{b-4}}, h2o_mean -> h2o_4_{{b//8}}_{{b}}_mean; a family "
                        f"without a rule (h2o, vatp) takes --score; any of: {', '.join(FAMILIES)}; or one under an allocation of head "
                        "and layer budgets, <allocation>+<family>: adakv+h2o_mean, retrieval+h2o_mean, pyramid+tova, ... "
                        "(the budget is the average per KV head)")
    p.add_argument("--ppl-tokens", type=int, default=2048, help="tokens scored per policy")
    p.add_argument("--ppl-chunk", type=int, default=32,
                   help="tokens per forward of the chunked PPL evaluation (1 = token by token)")
    add_text_options(p, "wikitext")
    p.add_argument("--cases", type=int, default=0,
                   help="also the passkey kept share of every policy (question-aware, with the full-cache control) "
                        "on this many cases per phrasing and length (their depths spread over 0.1-0.9; all three "
                        "phrasings, pooled); 0 = none")
    p.add_argument("--lengths", nargs="+", type=int, default=[1280],
                   help="prompt lengths (tokens) of the passkey cases (with --cases)")
    p.add_argument("--recent-share", type=float, default=0.125,
                   help="recent window of every family but streaming, as a share of the budget")
    p.add_argument("--texts", nargs="+", default=None, metavar="TEXT",
                   help="PPL on several texts, each (policy, text) a unit of its own at batch 1: wikitext (encyclopaedic), "
                        "pg19:<book id> (prose), code:<stdlib module> (code, e.g. code:argparse), licence:python "
                        "(legal) or a text file; a table of the gap closed by genre follows (default: the one text "
                        "of --corpus / --pg19-book / --text-file)")
    units.add_arguments(p)
    g = p.add_argument_group("throughput")
    g.add_argument("--batches", nargs="+", type=int, default=None,
                   help=f"batch sizes (default: 1, 2, 4, ... until memory runs out, at most {MAX_BATCH['cpu']} "
                        f"on CPU, {MAX_BATCH['cuda']} on CUDA)")
    g.add_argument("--context", type=int, default=None,
                   help=f"prompt tokens per row (default {DEFAULT_CONTEXT['cpu']} on CPU, "
                        f"{DEFAULT_CONTEXT['cuda']} on CUDA)")
    g.add_argument("--new-tokens", type=int, default=None,
                   help=f"tokens generated per run (default {DEFAULT_NEW_TOKENS['cpu']} on CPU, "
                        f"{DEFAULT_NEW_TOKENS['cuda']} on CUDA)")
    g.add_argument("--repeats", type=int, default=1, help="interleaved repeats per batch size")
    g.add_argument("--throughput-budget", type=budget, default=256, help="the compressed policies' budget")


def rule_family(name: str) -> str:
    """argparse type of sweep's --rules: a family, or <allocation>+<family> (`h2o.names`: the registry's table, no
    torch)."""
    error = names.family_error(name)
    if error:
        raise argparse.ArgumentTypeError(error)
    return name


def heatmap(p) -> None:
    p.add_argument("--layers", nargs="+", type=int, default=None,
                   help="layer indices, negative from the end (default: first, middle, last)")
    p.add_argument("--tokens", type=int, default=128, help="text length (tokens)")
    p.add_argument("--sinks", type=int, default=4, help="leading tokens counted as attention sinks")
    p.add_argument("--top-k", type=int, default=8, help="heavy hitters marked among the other tokens")
    add_text_options(p, "wikitext")


def perf(p) -> None:
    add_text_options(p, "pg19")
    p.add_argument("--policy", default="h2o_4_32_256",
                   help="the compressed policy whose bookkeeping is timed: any evicting policy (h2o_4_32_256, "
                        "tova_4_32_256, kvzip_4_32_256, ...), against --streaming and the full cache at its budget")
    p.add_argument("--streaming", default="streaming_4_252", type=streaming_policy,
                   help="the StreamingLLM policy (streaming_<sinks>_<window>) timed beside --policy, at the same "
                        "budget")
    p.add_argument("--allocation", nargs="+", default=["adakv"],
                   help=f"the allocations timed against the --policy rule uniform, each its own ratio "
                        f"({', '.join(ALLOCATIONS)}, or with parameters: adakv_0.2, retrieval_0.1_4, ...); 'none' to "
                        "skip them")
    p.add_argument("--context", type=int, default=4096, help="prompt tokens before the timed decode steps")
    p.add_argument("--decode-steps", type=int, default=64, help="timed single-token steps per configuration, "
                   "interleaved")
    p.add_argument("--prefill", type=int, nargs="+", default=[2048],
                   help="tokens of the timed prefill; several lengths give a prefill ratio each")
    p.add_argument("--prefill-chunk", type=int, nargs="+", default=[0],
                   help="tokens per forward of the timed prefill: 0 = the whole prefill in one forward, C = chunks of "
                        "C tokens, eviction (and a replaying rule's replay) after each; several give a ratio each")
    p.add_argument("--rounds", type=int, default=5, help="interleaved prefills per configuration")
    p.add_argument("--kv-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                   help="tokens fed before each KV-bytes reading")
    p.add_argument("--kv-chunk", type=int, default=1024, help="tokens per forward while feeding the KV-bytes run")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps of every configuration before the "
                   "timed ones (the compiled ones compile in the first)")
    p.add_argument("--prefill-parts", action="store_true",
                   help="also profile one --prefill of --policy and --streaming (torch.profiler) and print where the "
                        "attention's time goes: QKᵀ, softmax, PV, column sums, masks, eviction, SDPA")
    p.add_argument("--compile", action="store_true",
                   help="also time --policy and --streaming in the static layout through torch.compile(model.forward) "
                        "and transformers' StaticCache of the same capacity compiled the same way, interleaved "
                        "with the eager configurations; with the step's floor (weight bytes / copy bandwidth)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode (default: reduce-overhead on CUDA, i.e. CUDA graphs; default elsewhere)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (inductor; aot_eager traces without generating code, for tests)")


def heads(p) -> None:
    p.add_argument("--random-tokens", type=int, default=HEAD_SCORE_DEFAULTS["random_tokens"],
                   help="random tokens per sequence (each sequence is fed twice in a row) for induction and echo")
    p.add_argument("--random-sequences", type=int, default=HEAD_SCORE_DEFAULTS["repeats"],
                   help="random sequences averaged over (each of --random-tokens, fed twice)")
    p.add_argument("--cases", type=int, default=HEAD_SCORE_DEFAULTS["cases"],
                   help="calibration needle cases for the retrieval score (0: no retrieval score)")
    p.add_argument("--ablation-cases", type=int, default=HEAD_SCORE_DEFAULTS["ablation_cases"],
                   help="needle cases of the ablation score (each KV head restricted to sinks + recent in turn: "
                        "1 + layers x KV heads forwards per case; 0: no ablation score)")
    p.add_argument("--reconstruction-tokens", type=int, default=HEAD_SCORE_DEFAULTS["reconstruction_tokens"],
                   help="calibration tokens replayed for the reconstruction score (KVzip's context-independent head "
                        "score, in windows of 1,024; what reconstruction_<share>_<factor> asks for: 2048; 0: none)")
    p.add_argument("--context-tokens", type=int, default=HEAD_SCORE_DEFAULTS["context_tokens"],
                   help="haystack tokens per needle case")
    p.add_argument("--seed", type=int, default=HEAD_SCORE_DEFAULTS["seed"], help="seed of the random tokens and the needles")
    p.add_argument("--calibration-book", default=CALIBRATION_BOOK,
                   help="PG-19 test book of the needle haystacks (one that no evaluation uses)")
    p.add_argument("--top", type=int, default=8, help="heads listed per score")
    p.add_argument("--recompute", action="store_true", help="recompute even when cached scores with the same inputs exist")


def surrogate(p) -> None:
    p.add_argument("--calibration-tokens", type=int, default=4096,
                   help="calibration tokens (windows of up to 1,024, the last held out) whose KVzip scores it is fitted on")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows' offsets and of the MLP's initial weights")
    p.add_argument("--calibration-book", default=CALIBRATION_BOOK,
                   help="PG-19 test book of the calibration text (one that no evaluation uses)")
    p.add_argument("--recompute", action="store_true", help="refit even when a cached surrogate with the same inputs exists")


def choose(p) -> None:
    p.add_argument("--sweep", nargs="+", required=True, metavar="SWEEP_JSON",
                   help="sweep.json of `h2o sweep --parts ppl --texts ...` (or its output directory); one per model "
                        "to choose for several models at once")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASKS_JSON",
                   help="tasks.json of `h2o tasks` runs on the tuning cases, one per protocol and model (or their "
                        "directories)")
    p.add_argument("--held-out-tasks", nargs="+", default=[], metavar="TASKS_JSON",
                   help="tasks.json of runs on held-out cases: reported, never used to choose")
    p.add_argument("--tuning-texts", nargs="+", required=True, metavar="TEXT",
                   help="the sweep's texts the criterion uses (its --texts labels); the others are held out")
    p.add_argument("--reference", default="streaming", help="the rule no candidate may fall below")
    p.add_argument("--candidates", nargs="+", default=None,
                   help="rule families / policies to choose among (default: every one measured in all the inputs)")
