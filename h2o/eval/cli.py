"""The `h2o` command: bench (the results table), tasks, stress, sweep, heatmap.

Each command is a module on the skeleton of `h2o.eval.command`; this file only wires them up:
it checks that the `[eval]` extras are installed (before anything else is imported), builds the
parser, refuses bad input through the command's `check` before any work, then runs it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shutil
import sys

COMMANDS = ("bench", "tasks", "stress", "sweep", "heatmap")
# import name -> the package that provides it (all in the [eval] extra)
EXTRAS = {"matplotlib": "matplotlib", "tqdm": "tqdm", "psutil": "psutil", "datasets": "datasets",
          "accelerate": "accelerate", "gguf": "gguf", "safetensors": "safetensors"}


def missing_extras() -> list[str]:
    return [package for module, package in EXTRAS.items() if importlib.util.find_spec(module) is None]


def build_parser() -> argparse.ArgumentParser:
    from .command import add_shared_options

    parser = argparse.ArgumentParser(prog="h2o", description="KV-cache compression benchmarks (StreamingLLM, H2O)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"h2o.eval.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        add_shared_options(p)
        p.set_defaults(module=module)
    return parser


def main(argv=None) -> int:
    missing = missing_extras()
    if missing:
        print(f"h2o: error: the evaluation extras are not installed (missing: {', '.join(missing)}); "
              "install them with: pip install 'h2o-kvcache[eval]'", file=sys.stderr)
        return 2
    import torch

    from .command import Session
    from .ppl import ValidityError

    args = build_parser().parse_args(argv)
    module = args.module
    session = None
    try:
        if args.threads is not None and args.threads < 1:
            raise ValueError("--threads must be >= 1")
        if args.buffer < 0:
            raise ValueError(f"--buffer must be >= 0, got {args.buffer}")
        plan = module.check(args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        existed = _exists(args.out)
        session = Session(args.command, args)
        return module.run(session, plan) or 0
    except (ValueError, FileNotFoundError, ValidityError) as err:
        if session is not None and not existed:
            _remove_if_empty(session.out)
        print(f"h2o {args.command}: error: {err}", file=sys.stderr)
        return 2


def _exists(path) -> bool:
    from pathlib import Path
    return Path(path).exists()


def _remove_if_empty(path) -> None:
    """A failed run leaves no empty output directory behind (only one this run created)."""
    if path.is_dir() and not any(path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
