"""`h2o bench` end to end: the table, CSV, JSON and plot, and its refusals."""

import csv
import json

import pytest

from h2o.eval.cli import main


def test_bench_on_a_random_model_measures_speed_and_memory_only(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["bench", "--model", "random:tiny-llama", "--policies", "streaming_2_14", "h2o_2_4_16",
                 "--buffer", "4", "--context", "40", "--new-tokens", "4", "--repeats", "2", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity is not measured" in printed and "| Configuration" in printed
    rows = list(csv.DictReader(open(out / "bench.csv")))
    assert [r["configuration"] for r in rows] == ["full", "streaming_2_14", "h2o_2_4_16_mean"]
    assert "wikitext_ppl" not in rows[0]
    payload = json.loads((out / "bench.json").read_text())
    assert payload["model"]["name"] == "random:tiny-llama" and payload["environment"]["torch"]
    kv = {r["configuration"]: float(r["kv_mib"]) * 2**20 for r in rows}
    # 40 + 3 decoded tokens kept by the full cache; 2 layers x (k + v) x 2 kv heads x 16 dims x fp32
    assert kv["full"] == 2 * 2 * 2 * 16 * 4 * 43
    assert kv["streaming_2_14"] < kv["full"] and kv["h2o_2_4_16_mean"] < kv["full"]
    assert all(float(r["tpot_median_ms"]) > 0 and float(r["ttft_s"]) > 0 for r in rows)
    assert float(rows[0]["ttft_over_full"]) == 1.0 and float(rows[0]["tpot_over_full"]) == 1.0
    assert not rows[1].get("gap_closed")  # no perplexity on random weights: no gap closed
    assert (out / "bench.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv, message", [
    (["--policies", "h2o_4_32_256", "--ppl-tokens", "300"], "never outgrows the largest budget"),
    (["--policies", "h2o_40_300_256"], "exceeds the budget"),
    (["--data-dir", "/nonexistent/corpora"], "wiki.test.raw"),
    (["--add-text-file", "/nonexistent/file.txt"], "no text file"),
    (["--new-tokens", "1"], "--new-tokens >= 2"),
    (["--lengths", "300"], "holds the whole 300-token task prompt"),
    (["--cases", "-1"], "--cases must be >= 0"),
    (["--context-chunk", "0"], "--context-chunk must be >= 1"),
])
def test_bench_refuses_bad_input_before_loading_anything(tmp_path, capsys, argv, message):
    out = tmp_path / "r"
    assert main(["bench", "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not list(out.glob("*")) if out.exists() else True


def test_bench_refuses_an_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["bench", "--out", str(blocker / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["bench", "--policies", "streaming_4_60", "h2o_4_8_64", "--buffer", "8", "--ppl-tokens", "160",
                 "--ppl-chunk", "16", "--context", "96", "--new-tokens", "3", "--repeats", "1", "--out", str(out),
                 "--cases", "1", "--lengths", "300", "--phrasings", "completion",
                 "--protocols", "question-aware", "streaming", "--context-chunk", "64", "--no-progress"])
    assert code == 0
    rows = {r["configuration"]: r for r in csv.DictReader(open(out / "bench.csv"))}

    def kept_cell(cell):  # "k/n [low, high]": solved, cases, and the Wilson interval of k / n
        count, interval = cell.split(" ", 1)
        k, n = map(int, count.split("/"))
        low, high = map(float, interval.strip("[]").split(", "))
        assert low <= k / n <= high
        return k, n

    # a retrieval column per protocol: the full cache's solved cases, and each policy's among them
    for column in ("passkey_kept", "passkey_kept_streaming"):
        solved, cases = kept_cell(rows["full"][column])
        assert cases == 1 and 0 <= solved <= 1
        for name in ("streaming_4_60", "h2o_4_8_64_mean"):
            kept, control = kept_cell(rows[name][column])
            assert control == solved and 0 <= kept <= control
            if control:
                assert float(rows[name][f"{column}_low"]) <= kept / control <= float(rows[name][f"{column}_high"])
    assert set(rows) == {"full", "streaming_4_60", "h2o_4_8_64_mean"}
    for r in rows.values():
        assert 1 < float(r["wikitext_ppl"]) < 200 and 1 < float(r["pg19_ppl"]) < 200
        # the cost columns: this row's TTFT and TPOT over the full cache's, measured in the same run
        full = rows["full"]
        assert float(r["ttft_over_full"]) == pytest.approx(float(r["ttft_s"]) / float(full["ttft_s"]), rel=1e-6)
        assert float(r["tpot_over_full"]) == pytest.approx(float(r["tpot_median_ms"]) / float(full["tpot_median_ms"]),
                                                           rel=1e-6)
    assert float(rows["h2o_4_8_64_mean"]["wikitext_ppl_after_eviction"]) > 1
    # H2O's gap closed against StreamingLLM of its budget (64 tokens), text by text, and the worst of them
    h2o, sllm, full = rows["h2o_4_8_64_mean"], rows["streaming_4_60"], rows["full"]
    assert h2o["gap_reference"] == "streaming_4_60" and not sllm["gap_closed"] and not full["gap_closed"]
    gaps = []
    for text in ("wikitext", "pg19"):
        if h2o[f"{text}_gap_interval"] == "no gap":
            assert h2o[f"{text}_gap_closed"] == ""
            continue
        s, p, f = (float(r[f"{text}_ppl"]) for r in (sllm, h2o, full))
        gaps.append((s - p) / (s - f))
        assert float(h2o[f"{text}_gap_closed"]) == pytest.approx(gaps[-1], rel=1e-6)
    assert (float(h2o["gap_closed"]) == pytest.approx(min(gaps), rel=1e-6)) if gaps else h2o["gap_closed"] == ""
    notes = json.loads((out / "bench.json").read_text())["notes"]
    assert any("chunked, 16 tokens per forward" in n and "10146.txt" in n for n in notes)
    for protocol in ("question-aware protocol", "streaming protocol (context in chunks of 64 tokens)"):
        assert any(n.startswith("Passkey kept: 1 passkey cases of 300 tokens per phrasing") and protocol in n
                   and "phrasing completion" in n and "paired (McNemar exact, 5%)" in n for n in notes), protocol
    printed = capsys.readouterr().out
    for header in ("| Passkey kept (question-aware)", "| Passkey kept (streaming)", "| Gap closed", "| TTFT x full",
                   "| TPOT x full"):
        assert header in printed, header
