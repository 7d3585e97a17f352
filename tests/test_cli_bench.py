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
    assert (out / "bench.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv, message", [
    (["--policies", "h2o_4_32_256", "--ppl-tokens", "300"], "never outgrows the largest budget"),
    (["--policies", "h2o_40_300_256"], "exceeds the budget"),
    (["--data-dir", "/nonexistent/corpora"], "wiki.test.raw"),
    (["--add-text-file", "/nonexistent/file.txt"], "no text file"),
    (["--new-tokens", "1"], "--new-tokens >= 2"),
    (["--lengths", "300"], "holds the whole 300-token task prompt"),
    (["--cases", "-1"], "--cases must be >= 0"),
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
                 "--cases", "1", "--lengths", "300", "--phrasings", "restate", "completion",
                 "--no-progress"])
    assert code == 0
    rows = {r["configuration"]: r for r in csv.DictReader(open(out / "bench.csv"))}

    def kept_cell(cell):  # "k/n [low, high]": solved, cases, and the Wilson interval of k / n
        count, interval = cell.split(" ", 1)
        k, n = map(int, count.split("/"))
        low, high = map(float, interval.strip("[]").split(", "))
        assert low <= k / n <= high
        return k, n

    # the retrieval column, pooled over both phrasings: the full cache's solved cases, and each policy's among them
    solved, cases = kept_cell(rows["full"]["passkey_kept"])
    assert cases == 2 and 0 <= solved <= 2
    for name in ("streaming_4_60", "h2o_4_8_64_mean"):
        kept, control = kept_cell(rows[name]["passkey_kept"])
        assert control == solved and 0 <= kept <= control
        if control:
            assert float(rows[name]["passkey_kept_low"]) <= kept / control <= float(rows[name]["passkey_kept_high"])
    assert set(rows) == {"full", "streaming_4_60", "h2o_4_8_64_mean"}
    for r in rows.values():
        assert 1 < float(r["wikitext_ppl"]) < 200 and 1 < float(r["pg19_ppl"]) < 200
    assert float(rows["h2o_4_8_64_mean"]["wikitext_ppl_after_eviction"]) > 1
    notes = json.loads((out / "bench.json").read_text())["notes"]
    assert any("chunked, 16 tokens per forward" in n and "10146.txt" in n for n in notes)
    assert any(n.startswith("Passkey kept: 1 passkey cases of 300 tokens per phrasing") and "restate, completion" in n
               and "paired (McNemar exact, 5%)" in n for n in notes)
    assert "| Passkey kept" in capsys.readouterr().out
