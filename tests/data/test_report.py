"""``python -m mita.data.report``: statistics table and rendered examples."""

from __future__ import annotations

import pytest

from mita.data.report import main, render_examples, task_stats

from .test_fmnist import fake_root  # noqa: F401  (fixture)


def test_stats_and_markdown_table(tmp_path, capsys):
    stats = task_stats("listops", "val", size=30, seq_len=128, cache_dir=tmp_path)
    assert stats["n"] == 30 and sum(stats["class_counts"]) == 30 and len(stats["class_counts"]) == 10
    assert 32 <= stats["length_min"] <= stats["length_mean"] <= stats["length_max"] <= 128
    assert stats["majority"] == pytest.approx(max(stats["class_counts"]) / 30)
    out = tmp_path / "table.md"
    assert main(["--tasks", "pathfinder", "--size", "10", "--cache-dir", str(tmp_path), "--no-images",
                 "--markdown", str(out)]) == 0  # fmt: skip
    rows = [line for line in out.read_text().splitlines() if line.startswith("| pathfinder")]
    assert [r.split("|")[2].strip() for r in rows] == ["train", "val", "test"]
    assert all(r.split("|")[3].strip() == "10" for r in rows)
    assert "| pathfinder | train | 10 |" in capsys.readouterr().out


def test_render_examples(fake_root, tmp_path):  # noqa: F811
    pytest.importorskip("matplotlib")
    root, _ = fake_root
    paths = render_examples(tmp_path / "img", root=root, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in paths) == ["data_fmnist.png", "data_image.png", "data_pathfinder.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000


def test_data_command_writes_figures_only_where_told(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--tasks", "listops", "--size", "4", "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    assert "pass --out DIR" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no docs/img under the current directory


def test_data_command_rejects_a_zero_size(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--tasks", "listops", "--size", "0"])
    assert exc.value.code == 2 and "must be >= 1, got 0" in capsys.readouterr().err
