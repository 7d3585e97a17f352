"""The `h2o` command: bench (the results table), tasks, stress, sweep, heatmap, perf, heads, surrogate, choose.

Each command is a module of `h2o.eval.commands` on the skeleton of `h2o.eval.session`, its options in
`h2o.eval.options`; this file only wires them up: it builds the parser and parses the arguments (`--help` and
argparse's own refusals answer there, before torch is imported), checks that the `[eval]` extras are installed,
refuses bad input through the command's `check` before any work, then runs it.

`h2o --help`, `h2o` alone and an unknown command are answered from the static table below, without
importing even the options; a command's options are built once that command is named (without torch,
transformers or the command's module: `h2o <command> --help` answers at once), and its module is imported only
to run it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shutil
import sys

# name -> one line of help: the same text as each module's HELP (a test holds them equal)
HELPS = {
    "bench": "the results table: PPL, speed and memory per policy",
    "tasks": "retrieval tasks (passkey, RULER NIAH, key-value, variable tracking) with a full-cache control",
    "stress": "long-context stress test: TPOT, memory and segment PPL per policy from 1k to 16k tokens",
    "sweep": "PPL vs cache budget per policy family, and decode throughput vs batch size until memory runs out",
    "heatmap": "attention heatmaps (log scale) of chosen layers over a short text: sinks and heavy hitters",
    "perf": "bookkeeping cost: decode-step and prefill time ratios against their floors, KV bytes vs tokens",
    "heads": "training-free KV-head scores: induction and echo on repeated random tokens, retrieval on calibration needles",
    "surrogate": "fit the surrogate of KVzip's scores that kvzap rules rank by, and report its held-out fit",
    "choose": "the joint criterion over sweep and tasks results: the rule never below StreamingLLM, best worst-case gap",
}
COMMANDS = tuple(HELPS)
NO_MODEL = ("choose",)  # commands that read results and run no model: no model, data or cache options
DESCRIPTION = "KV-cache compression benchmarks: StreamingLLM, H2O, the field's newer rules and head and layer budgets"
# import name -> the package that provides it (all in the [eval] extra)
EXTRAS = {"matplotlib": "matplotlib", "tqdm": "tqdm", "psutil": "psutil", "datasets": "datasets",
          "accelerate": "accelerate", "gguf": "gguf", "safetensors": "safetensors",
          "scipy": "scipy"}

# Hard-coded so that `h2o --help` imports nothing; a test parses every example with h2o.parse and
# checks the default rule against h2o.DEFAULT_SCORE.
POLICY_GRAMMAR = """\
policy names (--policies of bench, stress and tasks, perf's --policy; sweep's --rules, and tasks,
also build them from policy families and budgets):
  full                          keep every token (the baseline; bench and tasks always run it)
  streaming_<sinks>_<window>    StreamingLLM: the first <sinks> tokens (attention sinks) + the
                                last <window> tokens; budget = sinks + window
                                e.g. streaming_4_252 (budget 256), streaming_4_508
  h2o_<sinks>_<recent>_<budget>[_mean|_sum]
                                H2O: <sinks> + the last <recent> tokens + heavy hitters (chosen per
                                KV head by the attention each token received) up to <budget>
                                tokens; score rule _mean (the default, h2o.DEFAULT_SCORE) or _sum
                                (the paper's); --score sets it for names without one
                                e.g. h2o_4_32_256 (= h2o_4_32_256_mean), h2o_4_64_512_sum
  tova_<sinks>_<recent>_<budget>
                                TOVA: heavy hitters by the newest query's attention only
                                e.g. tova_4_32_256
  a2sf_<sinks>_<recent>_<budget>_<gamma>
                                A2SF: attention received with a forgetting factor gamma in (0, 1]
                                e.g. a2sf_4_32_256_0.95
  vatp_<sinks>_<recent>_<budget>[_mean|_sum]
                                VATP: H2O's score x the value's L1 norm, e.g. vatp_4_32_256
  vlen_<sinks>_<recent>_<budget>[_mean|_sum]
                                keys_values' h2o-vlen: H2O over attention x the value's L2 norm,
                                renormalised per query, e.g. vlen_4_32_256
  knorm_<sinks>_<recent>_<budget>
                                the keys with the lowest L2 norm, e.g. knorm_4_32_256
  keydiff_<sinks>_<recent>_<budget>
                                KeyDiff: the keys least like the mean key, e.g. keydiff_4_32_256
  snapkv_<sinks>_<recent>_<budget>_<window>[+<rule>]
                                SnapKV: prompt keys by the attention of the last <window> prompt
                                queries (question-aware), then H2O's sum, e.g. snapkv_4_32_256_16;
                                +<rule>: then any decode-time rule, e.g. snapkv_4_32_256_16+tova
  caote_<sinks>_<recent>_<budget>
                                CAOTE: keep the tokens whose eviction would move the newest
                                query's attention output most, e.g. caote_4_32_256
  kvzip_<sinks>_<recent>_<budget>[+<rule>]
                                KVzip: keys scored by a replay of the context (the model asked to
                                repeat it) before any question; e.g. kvzip_4_32_256,
                                global+kvzip_4_32_256 (one top-k over every layer and head)
  kvzap_<sinks>_<recent>_<budget>[_mlp]
                                KVzap-style: each key ranked by a surrogate of its KVzip score,
                                predicted from the key and value (fitted once per model on
                                calibration text: h2o surrogate); no replay. e.g. kvzap_4_32_256,
                                global+kvzap_4_32_256, kvzap_4_32_256_mlp (the MLP, not the linear fit)
  recommended_<budget>          h2o.recommended(budget): the measured choice, e.g. recommended_256
  <allocation>+<rule>           head and layer budgets around any rule above; the rule's budget is
                                the AVERAGE per KV head (never more KV bytes than the rule uniform):
                                retrieval_<share>_<factor>  the top <share> of KV heads by retrieval
                                  score (h2o heads) hold <factor> x budget, the rest share what is left
                                induction_<share>_<factor>  the same, heads ranked by induction score
                                ablation_<share>_<factor>  the same, heads ranked by ablation score
                                reconstruction_<share>_<factor>  the same, heads ranked by KVzip's
                                  context-independent head score (h2o heads --reconstruction-tokens)
                                adakv_<floor>  Ada-KV: a layer's budget split across its heads at
                                  every eviction by the rule's own scores, >= <floor> x budget each
                                global_<floor>  one budget for the whole cache: every layer's and
                                  KV head's slots ranked together after each forward, the cache's
                                  layers evicted together, >= <floor> x budget each head
                                headkv_<floor>[_<factor>]  HeadKV: each head >= <floor> x budget and
                                  <= <factor> x budget (default 4), the rest water-filled in
                                  proportion to its retrieval score (h2o heads)
                                pyramid_<beta>  PyramidKV: budgets fall linearly with depth
                                e.g. adakv+h2o_4_32_256, retrieval_0.1_4+h2o_4_32_256,
                                pyramid_20+tova_4_32_256; families too: --policies adakv+h2o_mean
  a policy registered with h2o.register_policy (an allocation with h2o.register_allocation) parses
  the same way (h2o.policy_names() lists the rules, h2o.policies.allocation.allocation_names() the
  allocations)
  names that spell the same policy (h2o_4_32_256, h2o_4_32_256_mean) are merged and run once"""

EXAMPLES = {
    "bench": ["h2o bench",
              "h2o bench --policies streaming_4_252 h2o_4_32_256 h2o_4_32_256_sum --ppl-mode stream",
              "h2o bench --model random:pythia-160m --no-ppl --context 1024 --policies full streaming_4_252 "
              "h2o_4_32_256 induction_0.1_4+h2o_4_32_256"],
    "tasks": ["h2o tasks --tasks passkey --lengths 1024 --budget-ratio 0.2",
              "h2o tasks --policies streaming_4_252 h2o_4_32_256 --lengths 1024"],
    "stress": ["h2o stress --positions reindex",
               "h2o stress --policies full streaming_4_252 h2o_4_32_256_sum --lengths 1024 4096"],
    "sweep": ["h2o sweep --parts ppl --budgets 64 128 256",
              "h2o sweep --parts throughput --model random:pythia-410m"],
    "heatmap": ["h2o heatmap --layers 0 -1 --tokens 96"],
    "perf": ["h2o perf", "h2o perf --decode-steps 32 --rounds 3 --kv-lengths 1024 4096"],
    "heads": ["h2o heads", "h2o heads --model random:tiny-llama --random-tokens 64 --recompute",
              "h2o heads --reconstruction-tokens 2048"],
    "surrogate": ["h2o surrogate", "h2o surrogate --model gemma3-270m --calibration-tokens 4096"],
    "choose": ["h2o choose --sweep results/sweep.json --tasks qa/tasks.json st/tasks.json --tuning-texts wikitext "
               "pg19:10146"],
}


def epilog(command: str | None = None) -> str:
    """The policy grammar, then examples (of one command, or one per command)."""
    lines = EXAMPLES[command] if command else [EXAMPLES[name][0] for name in COMMANDS]
    return POLICY_GRAMMAR + "\n\nexamples:\n" + "\n".join(f"  {line}" for line in lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; appends an option's default once, and only where it is true.

    No "(default: None)" or "(default: False)": an option whose unset value means something says so
    in its own help, which then holds the word "default" and gets nothing appended.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text.lower() or default is None or default is False
                or default is argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def missing_extras() -> list[str]:
    return [package for module, package in EXTRAS.items() if importlib.util.find_spec(module) is None]


def build_parser(command: str | None = None, full: bool = True) -> argparse.ArgumentParser:
    """The `h2o` parser. With `command`, that command gets its full options; with full=True and no command, every
    command does; with full=False and no command, none does (the static table only). No command's module is
    imported, nor torch (`h2o.eval.options`)."""
    parser = argparse.ArgumentParser(prog="h2o", description=DESCRIPTION, epilog=epilog(),
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        p = sub.add_parser(name, help=HELPS[name], description=HELPS[name], epilog=epilog(name),
                           formatter_class=HelpFormatter)
        if name == command or (full and command is None):
            from . import options

            getattr(options, name)(p)
            options.add_shared_options(p, model=name not in NO_MODEL, command=name)
            options.add_aliases(p, name)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command is None:  # --help, no command or an unknown one: answered by the static parser (exits)
        build_parser(full=False).parse_args(argv)
        return 2
    early = build_parser(command).parse_args(argv)  # the command's --help, argparse's refusals exit here; a
    # deprecated option name says so here, once
    wrong = plain_refusal(early) or name_refusal(early)  # and the checks of plain numbers and names, also before torch
    if wrong:
        print(f"h2o {command}: error: {wrong}", file=sys.stderr)
        return 2
    missing = missing_extras()
    if missing:
        print(f"h2o: error: the evaluation extras are not installed (missing: {', '.join(missing)}); "
              "install them with: pip install 'h2o-kvcache[eval]'", file=sys.stderr)
        return 2
    import torch

    from . import checkpoints, options
    from .session import Session
    from .ppl import ValidityError

    # parsed again now that torch is imported: --device's default is torch's own answer, no longer a guess
    with options.quiet_aliases():
        args = build_parser(command).parse_args(argv)
    module = importlib.import_module(f"h2o.eval.commands.{command}")
    session = None
    try:
        if hasattr(args, "model"):  # a bad name, or a hub id while offline: refused before any work
            checkpoints.check_name(args.model)
            if getattr(args, "positions", "original") == "reindex" and not args.model.startswith("random:"):
                from h2o.cache import reindex_refusal
                from h2o.models import layer_windows
                windows = layer_windows(checkpoints.load_config(args.model))
                if any(windows):
                    raise ValueError(f"--positions reindex on {args.model}: {reindex_refusal(windows)}")
        if getattr(args, "bos", False) is None:  # --bos unset: as the model's tokenizer does (before --resume compares)
            from . import data
            args.bos = data.adds_bos(checkpoints.load_tokenizer(args.model))
        plan = module.check(args)
        if hasattr(args, "resume"):  # commands whose work is units (h2o.eval.units): --ray, --workers, --resume
            from . import units
            units.check_args(args, args.command)
        if getattr(args, "threads", None) is not None:
            torch.set_num_threads(args.threads)
        existed = _exists(args.out)
        session = Session(args.command, args)
        return module.run(session, plan) or 0
    except (ValueError, FileNotFoundError, ValidityError) as err:
        print(f"h2o {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:  # whatever stopped the run (an error, Ctrl-C): nothing half-written stays behind
        if session is not None:
            session.discard()
            if not existed:
                _remove_if_empty(session.out)


def plain_refusal(args) -> str | None:
    """What is wrong with the shared options' plain numbers (no model, no torch needed), or None."""
    if getattr(args, "threads", None) is not None and args.threads < 1:
        return f"--threads must be >= 1, got {args.threads}"
    if getattr(args, "buffer", 0) < 0:
        return f"--buffer must be >= 0, got {args.buffer}"
    return None


PRESS = "kvpress:"  # h2o.eval.runners.PREFIX: a kvpress press's name, left to its own check (a test holds them equal)


def name_refusal(args) -> str | None:
    """What is wrong with the policy, rule-family and allocation names (bench, stress and tasks' --policies, perf's
    --policy, --streaming and --allocation), in the registry's words, or None: `h2o.names`, whose table is generated
    from the registry, checks them without torch. A name it lets through may still be refused by the registry when
    the command checks it (a rule's own constraints: SnapKV's window, A2SF's gamma, ...). sweep's --rules are
    checked as they are parsed (`options.rule_family`)."""
    from h2o import names

    for name in getattr(args, "policies", None) or ():
        if name.startswith(PRESS):
            continue
        # tasks takes rule families too (sized by --budgets or --budget-ratio), as h2o.eval.answers.variants reads them
        family = args.command == "tasks" and names.is_family(name)
        error = names.family_error(name) if family else names.policy_error(name)
        if error:
            return error
    if args.command == "perf":  # the allocation is timed around --policy: "<allocation>+<policy>" is what it runs
        given = [args.policy, args.streaming]
        if args.allocation != ["none"]:
            given += [f"{allocation}+{args.policy}" for allocation in args.allocation]
        for name in given:
            error = names.policy_error(name)
            if error:
                return error
    return None


def _exists(path) -> bool:
    from pathlib import Path
    return Path(path).exists()


def _remove_if_empty(path) -> None:
    """A failed run leaves no empty output directory behind (only one this run created)."""
    if path.is_dir() and not any(path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
