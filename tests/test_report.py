"""Comparison tables from saved results: exact cells, best-accuracy marks, loading."""

import json

import pytest

from coblax.app.report import format_table, load_records


def rec(method, budget, before, after, mac, par, model="lenet", scheme="CX,YN"):
    return {
        "model": model, "method": method, "scheme": scheme, "budget_mac": budget[0],
        "budget_param": budget[1], "mac_ratio": mac, "param_ratio": par,
        "acc_before_finetune": before, "acc_after_finetune": after, "base_acc": 0.99,
    }


RECORDS = [
    rec("cobla", (0.5, 0.5), 0.90, 0.98, 0.49, 0.5),
    rec("cptv", (0.5, 0.5), 0.85, 0.98, 0.48, 0.47),
    rec("cobla", (0.7, 0.6), 0.95, 0.985, 0.69, 0.6),
    rec("pos_greedy", (0.7, 0.6), None, 0.99, 0.2, 0.1),
    rec("cobla", (0.5, 0.5), 0.5, 0.5, 0.5, 0.5, model="vgg"),
]


def test_markdown_exact():
    text = format_table(RECORDS[:4], "md")
    assert text == (
        "### lenet — CX,YN (base accuracy 99.00)\n"
        "\n"
        "| method | 0.7/0.6 acc before FT | 0.7/0.6 acc after FT | 0.7/0.6 MAC ratio "
        "| 0.7/0.6 param ratio | 0.5/0.5 acc before FT | 0.5/0.5 acc after FT "
        "| 0.5/0.5 MAC ratio | 0.5/0.5 param ratio |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| cobla | **95.00** | 98.50 | 0.690 | 0.600 | **90.00** | **98.00** | 0.490 | 0.500 |\n"
        "| cptv | - | - | - | - | 85.00 | **98.00** | 0.480 | 0.470 |\n"
        "| pos_greedy | - | **99.00** | 0.200 | 0.100 | - | - | - | - |\n"
    )


def test_one_table_per_model_and_scheme():
    text = format_table(RECORDS, "md")
    assert text.count("### ") == 2 and "### vgg — CX,YN" in text
    other = RECORDS + [rec("cobla", (0.5, 0.5), 0.1, 0.2, 0.5, 0.5, scheme="CXY,N")]
    assert format_table(other, "md").count("### ") == 3


def test_csv_cells_and_marks():
    lines = format_table(RECORDS[:4], "csv").splitlines()
    assert lines[0].split(",")[:4] == ["model", "scheme", "method", "0.7/0.6 acc before FT"]
    assert lines[1] == 'lenet,"CX,YN",cobla,95.00*,98.50,0.690,0.600,90.00*,98.00*,0.490,0.500'
    assert lines[3] == 'lenet,"CX,YN",pos_greedy,-,99.00*,0.200,0.100,-,-,-,-'
    # The smallest ratio (0.200 / 0.100) is never marked: ratios are not scores.
    assert "0.200*" not in lines[3]


def test_tex_marks_and_escapes():
    text = format_table(RECORDS[:4], "tex")
    assert "\\begin{tabular}{lcccccccc}" in text
    assert "\\multicolumn{4}{c}{0.7/0.6} & \\multicolumn{4}{c}{0.5/0.5}" in text
    assert ("cobla & \\textbf{95.00} & 98.50 & 0.690 & 0.600 & \\textbf{90.00} & "
            "\\textbf{98.00} & 0.490 & 0.500 \\\\") in text
    assert "pos\\_greedy & - & \\textbf{99.00}" in text
    assert text.rstrip().endswith("\\end{tabular}")


def test_acc_scale_and_rounding_ties():
    recs = [
        rec("a", (0.5, 0.5), 0.91234, 0.5, 0.5, 0.5),
        rec("b", (0.5, 0.5), 0.91229, 0.4, 0.5, 0.5),
    ]
    lines = format_table(recs, "csv", acc_scale=1.0, acc_digits=3).splitlines()
    assert lines[1].split(",")[4] == "0.912*" and lines[2].split(",")[4] == "0.912*"


def test_load_records_from_dirs_and_files(tmp_path):
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "results.json").write_text(json.dumps({"records": RECORDS[:2]}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"records": RECORDS[2:]}))
    loaded = load_records([str(tmp_path / "run1"), str(other)])
    assert loaded == RECORDS
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"records": [{"model": "x"}]}))
    with pytest.raises(ValueError, match="record 0 lacks the keys method"):
        load_records([str(bad)])
    with pytest.raises(ValueError, match="records"):
        bad.write_text("[]")
        load_records([str(bad)])
    with pytest.raises(FileNotFoundError):
        load_records([str(tmp_path / "missing")])


def test_bad_format():
    with pytest.raises(ValueError, match="fmt must be one of"):
        format_table(RECORDS, "html")
