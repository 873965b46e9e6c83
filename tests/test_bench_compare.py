"""`raypp bench compare` on the tiny checkpoint, two layouts and small numbers: one row per
layout with both figures, the JSON and the plot; a malformed layout is a usage error."""
import json

import pytest

from raypp.cli import main


def test_compare_tp1_and_pp2(tiny_ckpt, tmp_path, capsys):
    out, png = tmp_path / "compare.json", tmp_path / "compare.png"
    rc = main(["bench", "compare", "--model", str(tiny_ckpt), "--layouts", "tp1,pp2", "--concurrency", "2",
               "--input-len", "8", "--output-len", "4", "--reps", "1", "--cpus-per-worker", "0.5",
               "--out", str(out), "--plot", str(png)])
    assert rc == 0
    rows = json.loads(out.read_text())["layouts"]
    assert [(r["layout"], r["tp"], r["pp"]) for r in rows] == [("tp1", 1, 1), ("pp2", 1, 2)]
    for r in rows:
        assert r["batch1_ms_per_token"] > 0 and r["saturated_tok_s"] > 0
        assert r["batch1_tok_s"] == pytest.approx(1e3 / r["batch1_ms_per_token"])
        assert len(r["bubble_ratio"]) == r["pp"] and all(0 <= b <= 1 for b in r["bubble_ratio"])
        assert r["predicted_batch1_ms_per_token"] > 0 and r["predicted_saturated_tok_s"] > 0
    assert png.stat().st_size > 1000
    assert "saturated tok/s" in capsys.readouterr().out


@pytest.mark.parametrize("layouts", ["tp2xpp2", "pp0", ""])
def test_malformed_layout_is_a_usage_error(tiny_ckpt, layouts, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "compare", "--model", str(tiny_ckpt), "--layouts", layouts])
    assert e.value.code == 2 and "--layouts" in capsys.readouterr().err
