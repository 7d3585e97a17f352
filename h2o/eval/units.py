"""The evaluation matrix as units of work: run in this process or on Ray, each kept on disk as it finishes.

A command that measures quality (`h2o tasks`, `h2o sweep --parts ppl`, the quality columns of `h2o bench`) cuts
its work into `Unit`s: (policy, case) for a retrieval task, the full-cache control of a case once, shared by
every policy; (policy, text) for perplexity. A unit is a JSON spec in, a JSON result out, computed by one
function (`WORK`) from the model alone, so the same unit gives the same result wherever it runs, and the
command builds its tables from the results alone, in its own order: a run on N Ray workers writes the same
rows and figures as the in-process run.

    Ledger     <out>/<command>_units.jsonl: a header (the configuration), then one line per finished unit,
               appended and flushed to disk as it finishes; `--resume OUT` runs only the units it lacks
    Local      runs units in this process, on the session's model
    RayPool    `--ray [ADDRESS] --workers N`: N Ray actors, each loading the model once; a unit whose worker
               dies runs again on another (a replacement worker is started); the run record names the cluster,
               and workers whose torch / transformers / h2o versions differ are refused

Speed and memory (TTFT, TPOT, throughput, attention time, peak memory) are never units: they need the
configurations interleaved in one process on one device, so a distributed run measures them in the driver's
process (`h2o bench --ray`, which says so) or refuses them (`h2o sweep --parts throughput --ray`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path

# work name -> "module:function(model, tokenizer, spec) -> result"; each a pure function of its spec and the model
WORK = {"answer": "h2o.eval.answers:answer_unit", "losses": "h2o.eval.ppl:losses_unit"}
# options that change where or how a run runs, never what it measures (a resumed run may differ in them)
NOT_CONFIGURATION = {"out", "resume", "ray", "workers", "no_progress", "module", "command"}
LOCAL = "local"


@dataclass(frozen=True)
class Unit:
    work: str  # a key of WORK
    label: str  # readable: what it computes
    spec: dict  # JSON-serialisable inputs

    @property
    def key(self) -> str:
        """Unique and stable: the label and a digest of the inputs (a resumed run never reuses a unit whose
        inputs changed)."""
        digest = hashlib.sha1(json.dumps([self.work, self.spec], sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.work}:{self.label}:{digest}"


def execute(model, tokenizer, unit: Unit) -> dict:
    module, function = WORK[unit.work].split(":")
    return getattr(importlib.import_module(module), function)(model, tokenizer, unit.spec)


# --- options ------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    g = p.add_argument_group("distributed and resumable runs (quality units; see h2o.eval.units)")
    g.add_argument("--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
                   help="run the units on Ray (pip install 'h2o-kvcache[ray]'): no address starts a local Ray for "
                        "the run; 'auto' or an address joins an existing cluster (ray start --head)")
    g.add_argument("--workers", type=int, default=None,
                   help="Ray workers, each loading the model once (default with --ray: 2)")
    g.add_argument("--resume", default=None, metavar="OUT",
                   help="finish the run whose units are in OUT (same command and options): only the missing units "
                        "run; the tables are those of an uninterrupted run. Works with or without --ray")


def configuration(args) -> dict:
    """What a run measures: every option but where and how it runs."""
    return json.loads(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in NOT_CONFIGURATION},
                                 default=str))


def ledger_path(out, command: str) -> Path:
    return Path(out) / f"{command}_units.jsonl"


def check_args(args, command: str) -> None:
    """Before any model loads: --workers, Ray installed for --ray, and a --resume that matches this run."""
    if args.workers is not None:
        if args.ray is None:
            raise ValueError("--workers needs --ray (in one process the units run one after another)")
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.ray is not None and importlib.util.find_spec("ray") is None:
        raise ValueError("--ray needs Ray, which is not installed: pip install 'h2o-kvcache[ray]'")
    if args.resume is None:
        return
    if args.out not in ("results", args.resume) and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ValueError(f"--resume {args.resume} writes its outputs there; drop --out {args.out}")
    args.out = args.resume
    path = ledger_path(args.resume, command)
    if not path.is_file():
        raise ValueError(f"--resume {args.resume}: no {path.name} there (a run of h2o {command} with --out "
                         f"{args.resume} leaves one)")
    header = Ledger.read(path)[0]
    want = configuration(args)
    if header.get("command") != command or header.get("configuration") != want:
        have = header.get("configuration", {})
        differ = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise ValueError(f"--resume {args.resume}: its units were made by a different run "
                         f"({'h2o ' + str(header.get('command')) if header.get('command') != command else ''}"
                         f"{' options ' + ', '.join('--' + k.replace('_', '-') for k in differ) if differ else ''}"
                         " differ); give the same command and options, or a new --out")


# --- the ledger ---------------------------------------------------------------------------------------

class Ledger:
    """<out>/<command>_units.jsonl: line 1 the header, then {"key", "result", "worker", "seconds"} per unit."""

    def __init__(self, path: Path, header: dict, resume: bool):
        self.path = path
        self.done: dict[str, dict] = {}
        self.dropped = 0  # lines of a resumed ledger that could not be read (a unit cut off mid-write)
        if resume:
            _, self.done, self.dropped = self.read(path)
            self.file = open(path, "a", encoding="utf-8")
        else:
            if path.exists():
                print(f"note: {path} of an earlier run is replaced (finish a run with --resume instead)")
            self.file = open(path, "w", encoding="utf-8")
            self._write({"header": header})

    @staticmethod
    def read(path: Path) -> tuple[dict, dict[str, dict], int]:
        header, done, dropped = None, {}, 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run killed while writing it
                    dropped += 1
                    continue
                if header is None:
                    header = entry.get("header")
                    if header is None:
                        raise ValueError(f"{path} is not an h2o units file (no header line)")
                elif "key" in entry:
                    done[entry["key"]] = entry["result"]
        if header is None:
            raise ValueError(f"{path} is empty: not an h2o units file")
        return header, done, dropped

    def append(self, key: str, result: dict, worker: str, seconds: float) -> None:
        self._write({"key": key, "result": result, "worker": worker, "seconds": round(seconds, 3)})
        self.done[key] = json.loads(json.dumps(result))

    def _write(self, entry: dict) -> None:
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


# --- where units run ----------------------------------------------------------------------------------

def versions() -> dict:
    """What must match between the driver and every worker."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "h2o": _h2o_version(),
            "python": platform.python_version()}


def _h2o_version() -> str:
    try:
        return importlib.metadata.version("h2o-kvcache")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def worker_info(model) -> dict:
    import torch

    device = str(next(model.parameters()).device)
    return {"host": socket.gethostname(), "pid": os.getpid(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "torch_threads": torch.get_num_threads(), **versions()}


class Local:
    """Units in this process, one after another, on the session's model."""

    kind = "in-process"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def run(self, units: list[Unit]):
        """Yields (unit, result, worker name, seconds) as each finishes."""
        for unit in units:
            start = time.perf_counter()
            result = execute(self.model, self.tokenizer, unit)
            yield unit, result, "local", time.perf_counter() - start

    def record(self) -> dict:
        return {"kind": self.kind}

    def shutdown(self) -> None:
        pass


def setup_of(args) -> dict:
    """What a worker needs to load the model as the driver would."""
    return {"model": args.model, "device": args.device, "dtype": args.dtype, "attn": args.attn,
            "device_map": args.device_map, "data_dir": args.data_dir, "threads": args.threads}


class _Worker:
    """A Ray actor: loads the model once, then computes units."""

    def __init__(self, setup: dict):
        import torch

        if setup["threads"]:
            torch.set_num_threads(setup["threads"])
        from . import checkpoints, head_score_cache, runners, surrogate_cache

        self.model, self.tokenizer = checkpoints.load_model(setup["model"], setup["device"], setup["dtype"],
                                                       setup["attn"], setup["device_map"])
        model, tokenizer = self.model, self.tokenizer
        runners.provide_head_scores(model, lambda **options: head_score_cache.scores_for(
            model, tokenizer, setup["model"], setup["data_dir"], **options))
        runners.provide_surrogate(model, lambda: surrogate_cache.surrogate_for(
            model, tokenizer, setup["model"], setup["data_dir"]))
        runners.provide_tokenizer(model, tokenizer)

    def info(self) -> dict:
        from . import checkpoints

        return {**worker_info(self.model), "model": checkpoints.describe(self.model)}

    def run(self, unit: Unit) -> dict:
        return execute(self.model, self.tokenizer, unit)


class RayPool:
    """N Ray actors, each loading the model once. A unit whose actor dies (killed, out of memory, node lost) is
    run again on another actor; a replacement actor is started for each one lost (at most 2 x N in a run)."""

    kind = "ray"

    def __init__(self, address: str, workers: int, setup: dict):
        import ray

        self.ray, self.setup, self.address = ray, setup, address
        self.owns = not ray.is_initialized()  # started (or joined) here: shut down here
        if self.owns:
            if address == LOCAL:
                keep = {k: v for k, v in os.environ.items()
                        if k.startswith(("H2O_", "HF_", "TRANSFORMERS_")) or k in ("HOME", "PYTHONPATH")}
                ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": keep})
            else:
                ray.init(address=address, log_to_driver=False)
        gpu = str(setup["device"]).startswith("cuda")
        self.actor = ray.remote(num_cpus=setup["threads"] or 1, num_gpus=1 if gpu else 0)(_Worker)
        self.workers = [self._start(i) for i in range(workers)]
        self.spares = 2 * workers
        self.infos = dict(zip((w[0] for w in self.workers), ray.get([w[1].info.remote() for w in self.workers])))
        self.lost: list[str] = []
        self.check_versions(list(self.infos.values()))

    def _start(self, index: int):
        return (f"w{index}", self.actor.remote(self.setup))

    @staticmethod
    def check_versions(infos: list[dict]) -> None:
        """Workers (and the driver, which builds the tables) must run the same torch, transformers and h2o."""
        mine = versions()
        for info in infos:
            differ = [k for k in ("torch", "transformers", "h2o") if info[k] != mine[k]]
            if differ:
                raise ValueError(f"Ray worker on {info['host']} (pid {info['pid']}) runs "
                                 + ", ".join(f"{k} {info[k]}" for k in differ) + " and the driver "
                                 + ", ".join(f"{k} {mine[k]}" for k in differ)
                                 + ": a table from mixed versions would not mean one thing; install the same "
                                   "versions on every node")

    def run(self, units: list[Unit]):
        """Yields (unit, result, worker name, seconds) as each finishes, whichever worker runs it."""
        ray = self.ray
        queue, running, started = list(reversed(units)), {}, {}  # ref -> (worker, unit)
        idle = list(self.workers)
        while queue or running:
            while queue and idle:
                worker = idle.pop(0)
                unit = queue.pop()
                ref = worker[1].run.remote(unit)
                running[ref], started[ref] = (worker, unit), time.perf_counter()
            done, _ = ray.wait(list(running), num_returns=1)
            ref = done[0]
            worker, unit = running.pop(ref)
            seconds = time.perf_counter() - started.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError:  # the worker died: its unit goes back, a replacement starts
                self.lost.append(worker[0])
                self.workers.remove(worker)
                queue.append(unit)
                if self.spares <= 0:
                    if not self.workers:
                        raise RuntimeError("every Ray worker died and no replacement is left; the finished "
                                           "units are on disk: run again with --resume") from None
                    continue
                self.spares -= 1
                name = f"w{len(self.infos)}"
                replacement = (name, self.actor.remote(self.setup))
                self.infos[name] = ray.get(replacement[1].info.remote())
                self.check_versions([self.infos[name]])
                self.workers.append(replacement)
                idle.append(replacement)
                continue
            idle.append(worker)
            yield unit, result, worker[0], seconds

    def record(self) -> dict:
        """The cluster, for the run record: address, each worker's host, device and versions, workers lost."""
        return {"kind": self.kind, "address": self.address, "workers": self.infos, "lost": self.lost,
                "ray": self.ray.__version__}

    def shutdown(self) -> None:
        for _, actor in self.workers:
            self.ray.kill(actor)
        if self.owns:
            self.ray.shutdown()


def worker_pids(pool: RayPool) -> dict[str, int]:
    return {name: info["pid"] for name, info in pool.infos.items()}


def describe_executor(record: dict) -> str:
    """One note line: where the units ran."""
    if record["kind"] != "ray":
        return "units: in this process"
    workers = record["workers"]
    hosts = sorted({w["host"] for w in workers.values()})
    devices = sorted({w["device"] for w in workers.values()})
    lost = f"; {len(record['lost'])} worker(s) lost and their units rerun" if record["lost"] else ""
    return (f"units: Ray ({record['address']}), {len(workers)} worker(s) on {', '.join(hosts)}, devices "
            f"{', '.join(devices)}{lost}")

