"""`h2o stress`, `h2o sweep`, `h2o heatmap` through the CLI on tiny random models: files, rows, exact
cache sizes, the memory stop and OOM paths, and bad input (exit 2, nothing written)."""

import csv
import importlib.util
import json
import math
import types
from fractions import Fraction

import pytest
import torch

from h2o.eval import checkpoints, cli, data

from h2o.eval.commands import heatmap, stress, sweep
from h2o.eval.ppl import token_losses

LLAMA, NEOX = "random:tiny-llama", "random:tiny-gpt-neox"


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a busy 2-core machine: two OpenMP threads wait on each other ~50x longer than they compute.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def h2o_cli(*argv) -> int:
    try:
        return cli.main([*map(str, argv), "--no-progress"])
    except SystemExit as exit:  # argparse's own errors (bad choice, bad int)
        return exit.code


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def kv_bytes(model_name, policy, tokens, batch=1):
    """Exact bytes of a cache holding `tokens` per layer: fp32 keys and values, plus, for an evicting
    policy, int64 arrival times per head, bool validity and int64 padding count per row, fp32 H2O scores."""
    c = checkpoints.random_config(model_name)
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = c.hidden_size // c.num_attention_heads
    per_token = 2 * kv_heads * head_dim * 4
    if policy != "full":
        per_token += kv_heads * 8 + 1 + (kv_heads * 4 if policy.startswith("h2o") else 0)
    return c.num_hidden_layers * batch * (per_token * tokens + (8 if policy != "full" else 0))


# --- stress ----------------------------------------------------------------------------------------

STRESS = ["--policies", "full", "streaming_4_12", "h2o_2_4_16", "--buffer", 4, "--context-chunk", 8, "--decode-steps", 2]


@pytest.mark.parametrize("model, positions", [(LLAMA, "original"), (NEOX, "reindex")])
def test_stress_rows_files_and_exact_cache_sizes(tmp_path, capsys, model, positions):
    out = tmp_path / "out"
    assert h2o_cli("stress", "--model", model, "--lengths", 16, 64, 2048, "--positions", positions,
                   "--out", out, *STRESS) == 0
    for name in ("stress.csv", "stress.json", "stress_tpot.png", "stress_memory.png", "stress_ppl.png"):
        assert (out / name).stat().st_size > 0
    rows = read_csv(out / "stress.csv")
    assert [(r["policy"], int(r["length"])) for r in rows] == [
        (p, n) for n in (16, 64, 2048) for p in ("full", "streaming_4_12", "h2o_2_4_16_mean")]
    for r in rows:
        assert r["status"] == "ok"
        kept = int(r["kept_tokens"])
        # full keeps everything seen (length + 2 decode steps); the others are cut to 16 after every
        # 8-token chunk (16 + 8 > 16 + 4), then take the 2 decode steps: 18, flat past the budget
        assert kept == (int(r["length"]) + 2 if r["policy"] == "full" else 18)
        if r["policy"] == "full":
            assert int(r["kv_bytes"]) == kv_bytes(model, r["policy"], kept)
        else:  # preallocated: the kept slots at least, at most budget + buffer + one chunk (16 + 4 + 8)
            assert kv_bytes(model, r["policy"], kept) <= int(r["kv_bytes"]) <= kv_bytes(model, r["policy"], 28)
        assert math.isclose(float(r["kv_mib"]), int(r["kv_bytes"]) / 2**20)
        assert 0 < float(r["tpot_min_ms"]) <= float(r["tpot_median_ms"])
        assert float(r["process_mem_mib"]) > 0 and 1 < float(r["segment_ppl"]) < 10_000
        # the 2048 segment uses positions up to 2049 > the tiny models' 2048; reindex spares compressed caches
        past = r["length"] == "2048" and (positions == "original" or r["policy"] == "full")
        assert r["past_trained_context"] == str(past)
    assert [int(r["segment_tokens"]) for r in rows[::3]] == [18, 48, 1984]
    first = [float(r["segment_ppl"]) for r in rows[:3]]
    assert first == pytest.approx([first[0]] * 3, rel=1e-5)  # 18 tokens < 16 + 4: nothing evicted yet
    payload = json.loads((out / "stress.json").read_text())
    assert payload["model"]["name"] == model and payload["environment"]["torch"] == torch.__version__
    assert payload["args"]["positions"] == positions and payload["lengths"] == [16, 64, 2048]
    assert payload["rows"][0]["kv_bytes"] == int(rows[0]["kv_bytes"])
    printed = capsys.readouterr().out
    assert "| full" in printed and "random weights: its PPL is meaningless" in printed
    assert "pass the model's trained context (2048) in the segments ending at 2048" in printed


def test_stress_stops_a_policy_that_would_not_fit_in_memory(tmp_path, monkeypatch, capsys):
    # tiny-llama: full = 512 B/token, streaming_4_12 ~ 11 KB at most. With 170 kB "available",
    # half of it (plus what the caches hold) fits the caches at 64 tokens (~45 kB) but not at 256 (~143 kB).
    monkeypatch.setattr(stress.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=170_000))
    out = tmp_path / "out"
    assert h2o_cli("stress", "--model", LLAMA, "--lengths", 16, 64, 256, "--policies", "full", "streaming_4_12",
                   "--buffer", 4, "--context-chunk", 8, "--decode-steps", 2, "--out", out) == 0
    rows = {(r["policy"], int(r["length"])): r for r in read_csv(out / "stress.csv")}
    assert [rows["full", n]["status"] for n in (16, 64, 256)] == ["ok", "ok", "skipped: would exceed memory"]
    assert rows["full", 256]["kv_bytes"] == "" and rows["full", 256]["tpot_median_ms"] == ""
    assert all(rows["streaming_4_12", n]["status"] == "ok" for n in (16, 64, 256))
    assert "full: skipped: would exceed memory from 256 tokens on" in capsys.readouterr().out
    assert (out / "stress_memory.png").is_file()


def test_stress_survives_out_of_memory(tmp_path, monkeypatch):
    real = stress._forward

    def forward(model, ids, cache):
        if cache.policy.name == "full" and cache.get_seq_length() >= 30:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(model, ids, cache)

    monkeypatch.setattr(stress, "_forward", forward)
    out = tmp_path / "out"
    assert h2o_cli("stress", "--model", NEOX, "--lengths", 16, 64, 96, "--out", out, *STRESS) == 0
    rows = {(r["policy"], int(r["length"])): r["status"] for r in read_csv(out / "stress.csv")}
    assert [rows["full", n] for n in (16, 64, 96)] == ["ok", "OOM", "OOM"]
    assert all(rows[p, n] == "ok" for p in ("streaming_4_12", "h2o_2_4_16_mean") for n in (16, 64, 96))
    notes = json.loads((out / "stress.json").read_text())["notes"]
    assert "full: OOM from 64 tokens on" in notes


@pytest.mark.parametrize("argv, message", [
    (["--lengths", 0, 16], "--lengths must be positive and strictly increasing, got 0 16"),
    (["--lengths", 64, 32], "--lengths must be positive and strictly increasing, got 64 32"),
    (["--lengths", 16, 17, "--decode-steps", 2], "checkpoints 16 and 17 are closer than --decode-steps 2"),
    (["--context-chunk", 0], "--context-chunk and --decode-steps must be >= 1"),
    (["--policies", "full", "h2o_4_300_256"], "sinks + recent (4 + 300) exceeds the budget 256"),
    (["--policies", "lru_16"], "unknown policy 'lru_16'"),
    (["--text-file", "/no/such/file.txt", "--model", "smollm2-135m"], "no text file at /no/such/file.txt"),
])
def test_stress_rejects_bad_input_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert h2o_cli("stress", "--model", LLAMA, "--out", out, *argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_an_unwritable_output_directory_is_an_error(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    for command in ("stress", "sweep", "heatmap"):
        assert h2o_cli(command, "--model", LLAMA, "--out", tmp_path / "file" / "out") == 2
        assert f"h2o {command}: error: output directory" in capsys.readouterr().err


# --- sweep -----------------------------------------------------------------------------------------

SWEEP = ["--budgets", 8, 16, "--ppl-tokens", 64, "--ppl-chunk", 4, "--buffer", 4, "--context", 32,
         "--new-tokens", 3, "--throughput-budget", 16]
SPEED_POLICIES = ["full", "streaming_4_12", "h2o_4_2_16_mean", "h2o_4_2_16_sum"]


def test_sweep_ppl_and_throughput(tmp_path, capsys):
    out = tmp_path / "out"
    assert h2o_cli("sweep", "--model", NEOX, "--batches", 1, 2, "--out", out, *SWEEP) == 0
    for name in ("sweep_ppl.csv", "sweep_ppl.png", "sweep_throughput.csv", "sweep_throughput.png", "sweep.json"):
        assert (out / name).stat().st_size > 0
    ppl = read_csv(out / "sweep_ppl.csv")
    assert [r["policy"] for r in ppl] == ["full", "streaming_4_4", "h2o_4_1_8_mean", "h2o_4_1_8_sum",
                                          "streaming_4_12", "h2o_4_2_16_mean", "h2o_4_2_16_sum"]
    # 4-token chunks: a layer holding more than budget + 4 is cut at 16 (budget 8) or 24 (budget 16) tokens
    assert [r["first_eviction"] for r in ppl] == ["", "16", "16", "16", "24", "24", "24"]
    assert all(int(r["max_kept"]) <= int(r["budget"]) + 4 for r in ppl[1:])
    model, _ = checkpoints.load_model(NEOX)
    ids = data.random_ids(model.config.vocab_size, 64)
    direct = token_losses(model, ids, "h2o_4_2_16_sum", chunk=4, prefill=4, buffer=4, progress=False)
    assert float(ppl[6]["ppl"]) == pytest.approx(direct.ppl(), rel=1e-9)
    assert float(ppl[0]["ppl"]) == pytest.approx(
        token_losses(model, ids, "full", chunk=4, prefill=4, buffer=4, progress=False).ppl(), rel=1e-9)

    speed = read_csv(out / "sweep_throughput.csv")
    assert [(int(r["batch"]), r["policy"]) for r in speed] == [(b, p) for b in (1, 2) for p in SPEED_POLICIES]
    kv = {(int(r["batch"]), r["policy"]): int(r["kv_bytes"]) for r in speed}
    # prompt 32 + 2 decode steps: full holds 34 tokens per row; the others were cut to 16 after the prompt, in
    # buffers of budget + buffer + 1 decode token = 21 slots (preallocated, written in place)
    for b in (1, 2):
        assert kv[b, "full"] == kv_bytes(NEOX, "full", 34, batch=b)
        assert kv[b, "streaming_4_12"] == kv_bytes(NEOX, "streaming", 21, batch=b)
        assert kv[b, "h2o_4_2_16_sum"] == kv_bytes(NEOX, "h2o", 21, batch=b)
    for r in speed:
        assert r["status"] == "ok" and float(r["decode_tok_s"]) == pytest.approx(
            int(r["batch"]) / (float(r["tpot_median_ms"]) / 1000))
    payload = json.loads((out / "sweep.json").read_text())
    assert payload["plan"]["batches"] == [1, 2] and payload["model"]["family"] == "gpt_neox"
    assert "environment" in payload and len(payload["ppl_rows"]) == 7
    assert "PPL is meaningless" in capsys.readouterr().out


def test_sweep_stops_when_memory_would_run_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=0))
    out = tmp_path / "out"
    assert h2o_cli("sweep", "--model", LLAMA, "--parts", "throughput", "--batches", 1, 2, 4,
                   "--rules", "streaming", "--out", out, *SWEEP) == 0
    rows = [(int(r["batch"]), r["policy"], r["status"]) for r in read_csv(out / "sweep_throughput.csv")]
    assert rows == [(1, "full", "ok"), (1, "streaming_4_12", "ok"),
                    (2, "full", "skipped: would exceed memory"), (2, "streaming_4_12", "skipped: would exceed memory")]
    assert "full: skipped: would exceed memory at batch 2" in capsys.readouterr().out
    assert not (out / "sweep_ppl.csv").exists()


def test_sweep_drops_the_policy_that_ran_out_of_memory(tmp_path, monkeypatch):
    real = sweep.measure_speed

    def measure(model, ids, policies, **kw):
        if "full" in policies and ids.shape[0] >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(model, ids, policies, **kw)

    monkeypatch.setattr(sweep, "measure_speed", measure)
    out = tmp_path / "out"
    assert h2o_cli("sweep", "--model", LLAMA, "--parts", "throughput", "--batches", 1, 2, 4,
                   "--rules", "streaming", "--out", out, *SWEEP) == 0
    rows = [(int(r["batch"]), r["policy"], r["status"]) for r in read_csv(out / "sweep_throughput.csv")]
    assert rows == [(1, "full", "ok"), (1, "streaming_4_12", "ok"), (2, "full", "OOM"),
                    (2, "streaming_4_12", "ok"), (4, "streaming_4_12", "ok")]


@pytest.mark.parametrize("argv, message", [
    (["--budgets", 4, 16], "argument --budgets: a budget is a whole number of tokens >= 8 (4 sinks plus a window), "
                           "got '4'"),
    (["--throughput-budget", 0], "argument --throughput-budget: a budget is a whole number of tokens >= 8"),
    (["--budgets", 128, "--ppl-tokens", 150], "--ppl-tokens 150 never outgrows the largest budget + buffer (128 + 64)"),
    (["--context", 300], "--context 300 does not outgrow --throughput-budget + --buffer (256 + 64)"),
    (["--batches", 2, 1], "--batches must be positive and strictly increasing, got 2 1"),
    (["--new-tokens", 1], "--new-tokens >= 2"),
    (["--rules", "lru"], "argument --rules: unknown rule family 'lru'"),
])
def test_sweep_rejects_bad_input(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert h2o_cli("sweep", "--model", LLAMA, "--out", out, *argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


# --- heatmap ---------------------------------------------------------------------------------------

def test_heatmap_shares_match_the_model(tmp_path, capsys):
    out = tmp_path / "out"
    assert h2o_cli("heatmap", "--model", LLAMA, "--tokens", 24, "--top-k", 3, "--layers", 0, -1, "--out", out) == 0
    for name in ("heatmap.csv", "heatmap.json", "heatmap_layer0.png", "heatmap_layer1.png"):
        assert (out / name).stat().st_size > 0
    payload = json.loads((out / "heatmap.json").read_text())
    assert payload["layers"] == [0, 1] and payload["model"]["attn_implementation"] == "eager"
    model, _ = checkpoints.load_model(LLAMA, attn_implementation="eager")
    ids = data.random_ids(model.config.vocab_size, 24)
    assert payload["token_ids"] == ids[0].tolist()
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    uniform_sinks = float(sum(Fraction(1, q + 1) for k in range(4) for q in range(k, 24)) / 24)
    for row, layer in zip(payload["rows"], (0, 1)):
        received = attentions[layer][0].mean(0).sum(0)
        heavy = received[4:].topk(3).indices + 4
        assert sorted(heavy.tolist()) == payload["received"][str(layer)]["heavy_hitters"]
        assert row["sink_share"] == pytest.approx(received[:4].sum().item() / 24, rel=1e-5)
        assert row["heavy_share"] == pytest.approx(received[heavy].sum().item() / 24, rel=1e-5)
        assert row["uniform_sink_share"] == pytest.approx(uniform_sinks, rel=1e-6)
        assert len(row["sink_share_per_head"]) == 4
    assert len(read_csv(out / "heatmap.csv")) == 2
    assert "eager attention (output_attentions needs it)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--layers", 2], "unknown layer index 2: the model has 2 layers (0..1, or -2..-1)"),
    (["--layers", -3], "unknown layer index -3"),
    (["--tokens", 6], "--tokens (6) must exceed --sinks (4) + --top-k (8)"),
])
def test_heatmap_rejects_bad_input(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert h2o_cli("heatmap", "--model", LLAMA, "--out", out, *argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_heatmap_refuses_maps_that_would_not_fit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(heatmap.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=1 << 20))
    assert h2o_cli("heatmap", "--model", LLAMA, "--tokens", 512, "--out", tmp_path / "out") == 2
    assert "the attention maps of all 2 layers need 8 MiB" in capsys.readouterr().err


@pytest.mark.slow
def test_heatmap_on_the_embedded_model_shows_sinks(tmp_path):
    if importlib.util.find_spec(checkpoints.SMOLLM2_PACKAGE) is None:
        pytest.skip(f"the embedded model's weights package {checkpoints.SMOLLM2_PACKAGE} is not installed")
    out = tmp_path / "out"
    assert h2o_cli("heatmap", "--tokens", 48, "--layers", 15, "--out", out) == 0
    row = json.loads((out / "heatmap.json").read_text())["rows"][0]
    assert row["sink_share"] > 2 * row["uniform_sink_share"]  # a real model parks attention on its first tokens


def test_sweep_takes_every_registered_rule_family(tmp_path):
    out = tmp_path / "out"
    assert h2o_cli("sweep", "--model", NEOX, "--parts", "ppl", "--rules", "streaming", "tova", "a2sf", "vatp_sum",
                   "knorm", "keydiff", "--budgets", 16, "--ppl-tokens", 48, "--ppl-chunk", 4, "--buffer", 0,
                   "--out", out) == 0
    ppl = read_csv(out / "sweep_ppl.csv")
    assert [r["policy"] for r in ppl] == ["full", "streaming_4_12", "tova_4_2_16", "a2sf_4_2_16_0.95",
                                          "vatp_4_2_16_sum", "knorm_4_2_16", "keydiff_4_2_16"]
    assert all(int(r["max_kept"]) <= 16 for r in ppl[1:])


@pytest.mark.slow
def test_sweep_on_several_texts_reports_the_gap_closed(tmp_path):
    if importlib.util.find_spec(checkpoints.SMOLLM2_PACKAGE) is None:
        pytest.skip(f"the embedded model's weights package {checkpoints.SMOLLM2_PACKAGE} is not installed")
    out = tmp_path / "out"
    assert h2o_cli("sweep", "--parts", "ppl", "--texts", "wikitext", "pg19:10146", "--rules", "streaming", "tova",
                   "--budgets", 16, "--ppl-tokens", 48, "--ppl-chunk", 8, "--buffer", 0, "--cases", 1,
                   "--lengths", 200, "--out", out) == 0
    rows = read_csv(out / "sweep_ppl.csv")
    # the passkey column, pooled over the three phrasings: the full cache's solved cases, each policy's among them
    # (the same on every text row), each with its Wilson interval
    solved, cases = map(int, rows[0]["passkey_kept"].split(" ")[0].split("/"))
    assert cases == 3 and rows[1]["passkey_kept"] == rows[0]["passkey_kept"] and "[" in rows[0]["passkey_kept"]
    for r in rows[2:]:
        kept, control = map(int, r["passkey_kept"].split(" ")[0].split("/"))
        assert control == solved and kept <= control
    assert {r["genre"] for r in rows} == {"encyclopaedic", "prose"}
    assert all(r["gap_interval"] == "–" for r in rows)  # 48 tokens: too few blocks for an interval
    assert [(r["text"], r["policy"]) for r in rows] == [
        ("wikitext", "full"), ("pg19:10146", "full"), ("wikitext", "streaming_4_12"), ("pg19:10146", "streaming_4_12"),
        ("wikitext", "tova_4_2_16"), ("pg19:10146", "tova_4_2_16")]
    ppl = {(r["text"], r["policy"]): float(r["ppl"]) for r in rows}
    for text in ("wikitext", "pg19:10146"):
        s, f, t = ppl[text, "streaming_4_12"], ppl[text, "full"], ppl[text, "tova_4_2_16"]
        gap = next(float(r["gap_closed"]) for r in rows if r["text"] == text and r["policy"] == "tova_4_2_16")
        assert gap == pytest.approx((s - t) / (s - f))
    assert (out / "sweep_ppl.png").stat().st_size > 10_000


def test_sweep_merges_families_that_give_the_same_policy_and_rows_say_how(tmp_path, capsys):
    out = tmp_path / "out"
    assert h2o_cli("sweep", "--model", NEOX, "--parts", "ppl", "--rules", "streaming", "h2o", "h2o_mean",
                   "--budgets", 16, "--ppl-tokens", 48, "--ppl-chunk", 4, "--buffer", 0, "--out", out) == 0
    rows = read_csv(out / "sweep_ppl.csv")
    assert [r["policy"] for r in rows] == ["full", "streaming_4_12", "h2o_4_2_16_mean"]
    assert "give the same policy h2o_4_2_16_mean: it runs once" in capsys.readouterr().out
    assert {(r["ppl_mode"], r["ppl_tokens"], r["positions"], r["buffer"]) for r in rows} == {
        ("chunked, 4 tokens per forward", "48", "original", "0")}


def test_gap_closed_by_genre_and_the_sign_test_over_texts():
    rows = [{"text": t, "genre": g, "budget": 64, "family": f, "gap_closed": gap, "gap_high": high, "ppl": ppl}
            for t, g, f, gap, high, ppl in [
                ("pg19:1", "prose", "h2o", 0.6, 0.7, 10.0), ("pg19:2", "prose", "h2o", 0.4, 0.5, 11.0),
                ("licence:python", "legal", "h2o", -0.5, -0.2, 9.0),
                ("pg19:1", "prose", "tova", 0.2, 0.3, 10.5), ("pg19:2", "prose", "tova", 0.1, 0.2, 11.5),
                ("licence:python", "legal", "tova", -0.1, 0.1, 8.5)]]
    by = {(r["genre"], r["family"]): r for r in sweep.gap_by_genre(rows)}
    assert by["prose", "h2o"]["mean_gap_closed"] == pytest.approx(0.5) and by["prose", "h2o"]["lowest_gap_closed"] == 0.4
    assert (by["legal", "h2o"]["below_streaming"], by["legal", "h2o"]["surely_below"]) == (1, 1)
    assert (by["legal", "tova"]["below_streaming"], by["legal", "tova"]["surely_below"]) == (1, 0)
    (pair,) = sweep.compare_over_texts(rows + [{"text": "x", "genre": None, "budget": None, "family": "full",
                                                 "gap_closed": None, "gap_high": None, "ppl": 5.0}])
    assert (pair["family_a"], pair["family_b"], pair["a_lower"], pair["b_lower"]) == ("h2o", "tova", 2, 1)
    assert pair["verdict"] == "not separated" and pair["p_value"] == 1.0


def test_no_progress_hides_the_libraries_bars_too(tmp_path, capfd):
    """Issue 42: --no-progress left transformers' "Loading weights" bar; every bar is off now."""
    import transformers

    try:
        assert h2o_cli("heatmap", "--model", "smollm2-135m", "--tokens", 24, "--layers", 0,
                       "--out", tmp_path / "out") == 0
        assert "Loading weights" not in capfd.readouterr().err
    finally:  # the switches are process-wide: back on for the other tests
        transformers.utils.logging.enable_progress_bar()
        import datasets
        datasets.enable_progress_bars()
