from __future__ import annotations

from pathlib import Path

import pytest

from ltcore.eval.plots import plot_confusion, plot_recall_vs_count

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 2000  # a rendered figure, not an empty canvas


def test_plot_confusion_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "confusion.png"
    uri = plot_confusion([[5, 1, 0], [2, 3, 0], [0, 0, 0]], ["nv", "mel", "df"], str(out))
    assert uri == str(out)
    _check_png(out)


def test_plot_recall_vs_count_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "recall.png"
    plot_recall_vs_count({"nv": 0.9, "mel": 0.6, "df": None}, {"nv": 6705, "mel": 1113, "df": 115}, str(out))
    _check_png(out)
    out2 = tmp_path / "recall_seq.png"
    plot_recall_vs_count({"a": 1.0, "b": 0.0}, [10, 1], str(out2))
    _check_png(out2)


def test_plot_confusion_shape_mismatch_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected"):
        plot_confusion([[1, 2], [3, 4]], ["a", "b", "c"], str(tmp_path / "x.png"))
