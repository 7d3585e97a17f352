"""Evaluation text: local corpora byte for byte, clear errors, explicit BOS, exact prefixes."""

import hashlib
import re

import pytest
import torch
from transformers import AutoTokenizer

from h2o.eval import checkpoints, data

WIKITEXT_TEST_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"  # shared/data/README.md


@pytest.fixture(scope="module")
def data_dir():
    root = data.default_data_dir()
    # CI always has the corpora: their absence is a failure, never a skip.
    assert root is not None and (root / "wikitext-2-raw" / "wiki.test.raw").is_file(), (
        f"evaluation corpora not found (default_data_dir() = {root}): "
        "set H2O_DATA_DIR or provide ../shared/data next to the repo")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    gguf = checkpoints.smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture
def no_hub(monkeypatch):
    def refuse(*args):
        raise AssertionError("the hub was tried although a data dir was given")
    monkeypatch.setattr(data, "_hub", refuse)


def test_wikitext_is_the_raw_test_file_byte_for_byte(data_dir, no_hub):
    docs, source = data.load_documents("wikitext", data_dir)
    assert list(docs) == ["test"]
    assert hashlib.sha256(docs["test"].encode("utf-8")).hexdigest() == WIKITEXT_TEST_SHA256
    assert source == f"local:{data_dir / 'wikitext-2-raw' / 'wiki.test.raw'}"
    assert data.load_document("wikitext")[0] == docs["test"]  # default data dir resolution


def test_pg19_first_test_book(data_dir, no_hub):
    text, source = data.load_document("pg19", data_dir=data_dir)
    assert source.endswith("pg19/test/10146.txt")
    assert text.startswith("ST. PAUL***\n\n\nE-text prepared by Josephine Paolucci")
    assert "REMINISCENCES OF PIONEER DAYS IN ST. PAUL" in text[:300]
    books, _ = data.load_documents("pg19", data_dir)
    assert len(books) == 90 and next(iter(books)) == "10146" and books["10146"] == text


def test_unknown_pg19_book_lists_available_ids(data_dir, no_hub):
    with pytest.raises(ValueError, match=r"no PG-19 test book '999'.*90 books, e\.g\. 10146, 10321"):
        data.load_document("pg19", "999", data_dir)
    with pytest.raises(ValueError, match="wikitext is a single document"):
        data.load_document("wikitext", "10146", data_dir)


def test_missing_corpus_names_the_fix_and_never_tries_the_hub(tmp_path, monkeypatch, no_hub):
    for corpus in data.CORPORA:
        with pytest.raises(FileNotFoundError, match=r"--data-dir or H2O_DATA_DIR .*\n  wikitext-2-raw/wiki.test.raw\n  pg19/test/<book id>.txt"):
            data.load_documents(corpus, tmp_path)
        with pytest.raises(FileNotFoundError, match="--data-dir or H2O_DATA_DIR"):
            data.load_document(corpus, data_dir=tmp_path)
    monkeypatch.setenv("H2O_DATA_DIR", str(tmp_path))  # the environment counts as explicit too
    assert data.default_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        data.load_document("pg19")


def test_unreachable_hub_names_the_offline_fix(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(data, "default_data_dir", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    for corpus in data.CORPORA:
        with pytest.raises(FileNotFoundError, match=r"Couldn't reach(.|\n)*--data-dir or set H2O_DATA_DIR(.|\n)*pg19/test/<book id>.txt"):
            data.load_document(corpus)


def test_bad_corpus_and_split():
    with pytest.raises(ValueError, match="unknown corpus 'c4'"):
        data.load_documents("c4")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.load_documents("wikitext", split="dev")


def test_text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"line one\r\nline two\n")
    assert data.load_text_file(path) == ("line one\r\nline two\n", f"file:{path.resolve()}")
    for blank in ("", " \n\t\n"):
        path.write_text(blank)
        with pytest.raises(ValueError, match="holds no text"):
            data.load_text_file(path)
    with pytest.raises(FileNotFoundError, match="no text file at"):
        data.load_text_file(tmp_path / "missing.txt")


def test_tokenize_controls_bos_explicitly(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    without = data.tokenize(tokenizer, text)
    with_bos = data.tokenize(tokenizer, text, add_bos=True)
    assert without.dtype == torch.long and without.shape == (1, len(plain))
    assert without[0].tolist() == plain and bos not in plain
    assert with_bos[0].tolist() == [bos] + plain  # exactly one BOS, first
    assert data.tokenize(tokenizer, text, 5, add_bos=True)[0].tolist() == [bos] + plain[:4]


def test_tokenize_prefix_equals_full_tokenization(data_dir, tokenizer):
    # tokenize() cuts long text before tokenizing: the tokens it keeps must not depend on the cut.
    for corpus in data.CORPORA:
        text, _ = data.load_document(corpus, data_dir=data_dir)
        full = tokenizer(text[:400_000], add_special_tokens=False)["input_ids"]
        for n in (1, 2, 3, 17, 64, 513, 2000, 8191, 30_000):
            assert data.tokenize(tokenizer, text, n)[0].tolist() == full[:n], (corpus, n)


def test_tokenize_errors(tokenizer):
    n = len(tokenizer("Hello world", add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=f"the text has {n} tokens, fewer than the 100 asked for"):
        data.tokenize(tokenizer, "Hello world", 100)
    with pytest.raises(ValueError, match=f"the text has {n + 1} tokens with BOS"):
        data.tokenize(tokenizer, "Hello world", 100, add_bos=True)
    with pytest.raises(ValueError, match="empty text"):
        data.tokenize(tokenizer, " \n ")
    with pytest.raises(ValueError, match="n_tokens must be more than 1"):
        data.tokenize(tokenizer, "Hello", 1, add_bos=True)


def test_random_ids():
    ids = data.random_ids(100, 50, batch=3, seed=1)
    assert ids.shape == (3, 50) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < 100
    assert torch.equal(ids, data.random_ids(100, 50, batch=3, seed=1))
    assert not torch.equal(ids, data.random_ids(100, 50, batch=3, seed=2))
    with pytest.raises(ValueError, match="must be positive"):
        data.random_ids(100, 0)


def test_text_specs_of_every_genre_are_read_through_the_data_layer():
    import sysconfig

    label, text, source, genre = data.load_spec("code:argparse")
    assert (label, genre) == ("code:argparse", "code") and "class ArgumentParser" in text
    assert source.startswith("stdlib:") and source.endswith("argparse.py")
    assert data.load_spec("code:email.message")[1].count("class Message") >= 1
    label, text, source, genre = data.load_spec("licence:python")
    assert genre == "legal" and "PYTHON SOFTWARE FOUNDATION LICENSE" in text
    assert source == f"licence:{sysconfig.get_paths()['stdlib']}/LICENSE.txt"
    assert data.load_spec("wikitext")[3] == "encyclopaedic" and data.load_spec("pg19:10146")[3] == "prose"
    for bad, message in [("code:no_such_module", "no standard-library module"),
                         ("code:pytest", "no standard-library module"),  # a third-party package is not stdlib
                         ("code:sys", "no standard-library module"),  # built in: no Python source
                         ("licence:gpl", "unknown; choose from python")]:
        with pytest.raises(ValueError, match=message):
            data.load_spec(bad)
