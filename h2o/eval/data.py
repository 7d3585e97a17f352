"""Evaluation text: WikiText-2 and PG-19 from a local data dir or the hub, the Python standard library's own source
and licence (on every machine), user files, token ids.

Local layout (CI: H2O_DATA_DIR=../shared/data; the corpora never live in this repo):

    <data dir>/wikitext-2-raw/wiki.test.raw     the raw file, read byte for byte
    <data dir>/pg19/test/<book id>.txt          one PG-19 book per file

Text specs (`load_spec`, `h2o sweep --texts`) and their genres (`GENRES`):

    wikitext          encyclopaedic   WikiText-2 raw test
    pg19:<book id>    prose           a PG-19 test book
    code:<module>     code            the source of a standard-library module of this Python (code:argparse,
                                      code:email.message), from sysconfig's stdlib folder
    licence:python    legal           this Python's LICENSE.txt (the PSF licence and its history)
    <path>            file            a UTF-8 text file
"""

from __future__ import annotations

import importlib.util
import os
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where ids are made: the command line's options read this module's names without torch
    import torch

CORPORA = ("wikitext", "pg19")
SPLITS = ("train", "validation", "test")
PG19_FIRST_BOOK = "10146"  # first book of the PG-19 test split, the one papers report on
_CHARS_PER_TOKEN = 8  # generous: English text runs ~4 characters per token
_MARGIN = 64  # extra tokens past the cut, so the cut cannot change the tokens kept


def default_data_dir() -> Path | None:
    """$H2O_DATA_DIR, else <repo root>/../shared/data if it exists, else None (use the hub)."""
    if os.environ.get("H2O_DATA_DIR"):
        return Path(os.environ["H2O_DATA_DIR"]).expanduser()
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return shared if shared.is_dir() else None


def load_documents(corpus: str, data_dir: str | Path | None = None, split: str = "test") -> tuple[dict[str, str], str]:
    """All documents of a corpus split as {document id: text}, and where they came from.

    WikiText-2 is one document (id = split); PG-19 is one document per book (id = Gutenberg id).
    """
    _check(corpus, split)
    root = _root(data_dir)
    if root is None:
        return _hub(corpus, split)
    if corpus == "wikitext":
        path = _wikitext_file(root, split)
        return {split: _read(path)}, f"local:{path}"
    books = _pg19_files(root, split)
    return {p.stem: _read(p) for p in books}, f"local:{books[0].parent}"


def load_document(corpus: str, doc: str | None = None, data_dir: str | Path | None = None) -> tuple[str, str]:
    """One test document: WikiText-2's test split, or the PG-19 test book `doc` (default 10146)."""
    _check(corpus, "test")
    if corpus == "wikitext":
        if doc not in (None, "test"):
            raise ValueError(f"wikitext is a single document; got doc={doc!r} (leave it unset)")
        docs, source = load_documents(corpus, data_dir)
        return docs["test"], source
    doc = PG19_FIRST_BOOK if doc is None else str(doc)
    root = _root(data_dir)
    if root is not None:
        path = root / "pg19" / "test" / f"{doc}.txt"
        if path.is_file():  # read one book, not all 90
            return _read(path), f"local:{path}"
        ids, source = [p.stem for p in _pg19_files(root, "test")], f"local:{path.parent}"
    else:
        docs, source = _hub(corpus, "test")
        if doc in docs:
            return docs[doc], f"{source} book {doc}"
        ids = list(docs)
    raise ValueError(f"no PG-19 test book {doc!r} in {source}; it has {len(ids)} books, e.g. {', '.join(ids[:8])}")


GENRES = {"wikitext": "encyclopaedic", "pg19": "prose", "code": "code", "licence": "legal", "file": "file"}
LICENCES = ("python",)


def load_stdlib_source(module: str) -> tuple[str, str]:
    """The source of a module of this Python's standard library (not a third-party package), and where it is."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin and spec.origin.endswith(".py") else None
    if origin is None or stdlib not in origin.parents or "site-packages" in origin.parts:
        raise ValueError(f"code:{module}: no standard-library module of that name with Python source in {stdlib} "
                         "(e.g. code:argparse, code:difflib, code:email.message)")
    return _read(origin), f"stdlib:{origin}"


def load_licence(name: str) -> tuple[str, str]:
    """A licence text on every machine: 'python' is this Python's LICENSE.txt."""
    if name not in LICENCES:
        raise ValueError(f"licence:{name}: unknown; choose from {', '.join(LICENCES)}")
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not path.is_file():
        raise FileNotFoundError(f"this Python has no licence file at {path}")
    return _read(path), f"licence:{path}"


def load_spec(spec: str, data_dir: str | Path | None = None) -> tuple[str, str, str, str]:
    """(label, text, source, genre) of a text spec (module docstring): wikitext, pg19:<id>, code:<module>,
    licence:python, or a file path."""
    kind, _, arg = spec.partition(":")
    if spec == "wikitext":
        return (spec, *load_document("wikitext", None, data_dir), GENRES["wikitext"])
    if kind == "pg19" and arg:
        return (spec, *load_document("pg19", arg, data_dir), GENRES["pg19"])
    if kind == "code" and arg:
        return (spec, *load_stdlib_source(arg), GENRES["code"])
    if kind == "licence" and arg:
        return (spec, *load_licence(arg), GENRES["licence"])
    return (Path(spec).name, *load_text_file(spec), GENRES["file"])


def load_text_file(path: str | Path) -> tuple[str, str]:
    """A user's text file (--text-file), read as is; it must be UTF-8 text (a clear error otherwise)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}")
    try:
        text = _read(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start} cannot be decoded: {e.reason}); "
                         "pass a plain-text file saved as UTF-8") from None
    if "\x00" in text:
        raise ValueError(f"{path} is not text: it holds NUL bytes (a binary file?); pass a plain-text file "
                         "saved as UTF-8")
    if not text.strip():
        raise ValueError(f"{path} holds no text (empty or whitespace only)")
    return text, f"file:{path.resolve()}"


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself starts a text with its BOS token (Gemma's does; SmolLM2's does not)."""
    if getattr(tokenizer, "bos_token_id", None) is None:  # no tokenizer, or one without a BOS token
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def tokenize(tokenizer, text: str, n_tokens: int | None = None, add_bos: bool = False) -> torch.Tensor:
    """Token ids [1, n] of `text` (its first n_tokens if given), BOS prepended only if add_bos.

    Special tokens are never added by the tokenizer itself: tokenizers (and transformers
    versions) disagree on whether they prepend BOS, so it is decided here, explicitly.
    """
    import torch

    if not text.strip():
        raise ValueError("cannot tokenize empty text")
    bos = []
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError(f"add_bos: this tokenizer ({type(tokenizer).__name__}) has no BOS token")
        bos = [tokenizer.bos_token_id]
    if n_tokens is None:
        return torch.tensor([bos + _encode(tokenizer, text)])
    if n_tokens <= len(bos):
        raise ValueError(f"n_tokens must be more than {len(bos)}, got {n_tokens}")
    want = n_tokens - len(bos)
    chars = _CHARS_PER_TOKEN * (want + _MARGIN)
    while True:  # tokenize a prefix, not a whole book; widen it until it holds enough tokens
        ids = _encode(tokenizer, text[:chars])
        if len(ids) >= want + _MARGIN or chars >= len(text):
            break
        chars *= 2
    if len(ids) < want:
        raise ValueError(f"the text has {len(bos) + len(ids)} tokens{' with BOS' if bos else ''}, "
                         f"fewer than the {n_tokens} asked for")
    return torch.tensor([bos + ids[:want]])


def random_ids(vocab_size: int, n_tokens: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Uniform random token ids [batch, n_tokens], the same for the same seed (random-weight models)."""
    import torch

    if min(vocab_size, n_tokens, batch) < 1:
        raise ValueError(f"vocab_size, n_tokens and batch must be positive, got {vocab_size}, {n_tokens}, {batch}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (batch, n_tokens), generator=generator)


def _root(data_dir: str | Path | None) -> Path | None:
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def _check(corpus: str, split: str) -> None:
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; choose one of {', '.join(CORPORA)}, or pass a text file")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _read(path: Path) -> str:
    # newline="" keeps the bytes as they are: wiki.test.raw has \r\n line ends.
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def _missing(what: Path, root: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found. Point --data-dir or H2O_DATA_DIR (now: {root}) at a folder laid out as\n"
        "  wikitext-2-raw/wiki.test.raw\n  pg19/test/<book id>.txt\n"
        "or unset both to load from the Hugging Face hub.")


def _wikitext_file(root: Path, split: str) -> Path:
    path = root / "wikitext-2-raw" / f"wiki.{'valid' if split == 'validation' else split}.raw"
    if not path.is_file():
        raise _missing(path, root)
    return path


def _pg19_files(root: Path, split: str) -> list[Path]:
    books = sorted((root / "pg19" / split).glob("*.txt"))  # file-name order is the split's order
    if not books:
        raise _missing(root / "pg19" / split / "<book id>.txt", root)
    return books


def _hub(corpus: str, split: str) -> tuple[dict[str, str], str]:
    """The hub copies (only reached when no local data dir is known)."""
    import datasets

    repo = "Salesforce/wikitext" if corpus == "wikitext" else "deepmind/pg19"
    try:
        if corpus == "wikitext":
            rows = datasets.load_dataset(repo, "wikitext-2-raw-v1", split=split)
            return {split: "".join(rows["text"])}, f"hub:{repo}"  # each row keeps its newline
        # PG-19 is a loading script, which datasets>=4 no longer runs: take the hub's parquet export.
        rows = datasets.load_dataset(repo, split=split, revision="refs/convert/parquet")
        return {r["url"].rstrip("/").rsplit("/", 1)[-1]: r["text"] for r in rows}, f"hub:{repo}"
    except Exception as e:
        raise FileNotFoundError(
            f"no local data dir and the hub copy of {corpus} ({repo}) could not be loaded: {e}\n"
            "Offline, pass --data-dir or set H2O_DATA_DIR to a folder laid out as\n"
            "  wikitext-2-raw/wiki.test.raw\n  pg19/test/<book id>.txt") from e


def load_text(corpus: str = "wikitext", book: str | None = None, text_file: str | Path | None = None,
              data_dir: str | Path | None = None) -> tuple[str, str]:
    """(text, source): the user's `text_file` if given, else the corpus document (PG-19: `book`)."""
    if text_file:
        return load_text_file(text_file)
    return load_document(corpus, book, data_dir)


def token_ids(tokenizer, vocab_size: int, text: tuple[str, str] | None, n: int,
              add_bos: bool = False) -> tuple[torch.Tensor, str]:
    """[1, n] ids of `text` (pretrained models), or random ids when there is no tokenizer (random weights)."""
    if tokenizer is None:
        return random_ids(vocab_size, n), "random ids (random-weight model, no tokenizer)"
    return tokenize(tokenizer, text[0], n, add_bos), f"first {n} tokens of {text[1]}"
