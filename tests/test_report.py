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


def test_recalibrated_accuracy_gets_its_own_column():
    """Records with ``acc_before_finetune_recalibrated`` (finetune.recalibrate_bn) add a
    column after "acc before FT", marked on its own; the ratios stay unmarked."""
    a = rec("cobla", (0.5, 0.5), 0.10, 0.80, 0.5, 0.4) | {"acc_before_finetune_recalibrated": 0.60}
    b = rec("alds", (0.5, 0.5), 0.20, 0.82, 0.4, 0.3) | {"acc_before_finetune_recalibrated": 0.40}
    lines = format_table([a, b], "csv").splitlines()
    assert lines[0].split(",")[3:] == ["0.5/0.5 acc before FT", "0.5/0.5 acc before FT (BN recal.)",
                                       "0.5/0.5 acc after FT", "0.5/0.5 MAC ratio", "0.5/0.5 param ratio"]
    assert lines[1] == 'lenet,"CX,YN",cobla,10.00,60.00*,80.00,0.500,0.400'
    assert lines[2] == 'lenet,"CX,YN",alds,20.00*,40.00,82.00*,0.400,0.300'
    tex = format_table([a, b, rec("alds", (0.3, 0.3), 0.1, 0.7, 0.3, 0.3)], "tex")
    assert "\\begin{tabular}{lcccccccccc}" in tex
    assert "\\cmidrule(lr){2-6} \\cmidrule(lr){7-11}" in tex
    assert format_table(RECORDS[:4], "csv") == format_table([r | {"acc_before_finetune_recalibrated": None}
                                                             for r in RECORDS[:4]], "csv")


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


def rank_rec(method, budget, ranks, seed=0, status="ok"):
    out = rec(method, budget, 0.9, 0.95, budget[0], budget[1], model="vgg_small", scheme="tai")
    out.update(seed=seed, status=status, ranks=ranks,
               full_ranks={"conv1_1": 9, "conv2_1": 96, "fc1": 256} if ranks else None)
    return out


RANK_RECORDS = [
    rank_rec("cobla", (0.5, 0.5), {"conv1_1": 3, "conv2_1": 40, "fc1": 100}),
    rank_rec("uniform", (0.5, 0.5), {"conv1_1": 4, "conv2_1": 48, "fc1": 128}),
    rank_rec("cobla", (0.7, 0.7), {"conv1_1": 5, "conv2_1": 60, "fc1": 180}),
    rank_rec("uniform", (0.7, 0.7), None, status="failed"),
    rank_rec("vbmf", (0.7, 0.7), {"conv1_1": 9, "conv2_1": 30}),
]


def test_ranks_markdown_exact(tmp_path, capsys):
    from coblax.app.cli import main
    from coblax.app.report import format_ranks

    expected = (
        "### vgg_small — tai, budget 0.7/0.7 (MAC/param): ranks kept per layer\n"
        "\n"
        "| layer | full | cobla | uniform | vbmf |\n"
        "|---|---:|---:|---:|---:|\n"
        "| conv1_1 | 9 | 5 | failed | 9 |\n"
        "| conv2_1 | 96 | 60 | failed | 30 |\n"
        "| fc1 | 256 | 180 | failed | - |\n"
        "\n"
        "### vgg_small — tai, budget 0.5/0.5 (MAC/param): ranks kept per layer\n"
        "\n"
        "| layer | full | cobla | uniform |\n"
        "|---|---:|---:|---:|\n"
        "| conv1_1 | 9 | 3 | 4 |\n"
        "| conv2_1 | 96 | 40 | 48 |\n"
        "| fc1 | 256 | 100 | 128 |\n"
    )
    assert format_ranks(RANK_RECORDS, "md") == expected
    (tmp_path / "results.json").write_text(json.dumps({"records": RANK_RECORDS}))
    assert main(["table", str(tmp_path), "--ranks"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_ranks_csv_and_tex_with_seeds():
    from coblax.app.report import format_ranks

    seeds = [
        rank_rec("cobla", (0.5, 0.5), {"conv1_1": 3, "conv2_1": 40, "fc1": 100}, seed=0),
        rank_rec("cobla", (0.5, 0.5), {"conv1_1": 3, "conv2_1": 44, "fc1": 101}, seed=1),
        rank_rec("cobla", (0.5, 0.5), None, seed=2, status="failed"),
        rank_rec("pos_exact", (0.5, 0.5), {"conv1_1": 2, "conv2_1": 50, "fc1": 90}, seed=0),
        rank_rec("pos_exact", (0.5, 0.5), {"conv1_1": 2, "conv2_1": 50, "fc1": 90}, seed=1),
    ]
    assert format_ranks(seeds, "csv").splitlines() == [
        "model,scheme,budget,layer,full,cobla,pos_exact",
        "vgg_small,tai,0.5/0.5,conv1_1,9,3 (n=2),2",
        "vgg_small,tai,0.5/0.5,conv2_1,96,42.0 ± 2.8 (n=2),50",
        "vgg_small,tai,0.5/0.5,fc1,256,100.5 ± 0.7 (n=2),90",
    ]
    tex = format_ranks(seeds, "tex").splitlines()
    assert tex[1:5] == ["\\begin{tabular}{lrrr}", "\\toprule", "Layer & Full & cobla & pos\\_exact \\\\",
                        "\\midrule"]
    assert tex[6] == "conv2\\_1 & 96 & 42.0 $\\pm$ 2.8 (n=2) & 50 \\\\"
    assert format_ranks([rec("cobla", (0.5, 0.5), 0.9, 0.9, 0.5, 0.5)], "md") == ""


def test_ranks_command_without_ranks_exits_2(tmp_path, capsys):
    from coblax.app.cli import main

    (tmp_path / "results.json").write_text(json.dumps({"records": RECORDS}))
    assert main(["table", str(tmp_path), "--ranks"]) == 2
    assert "no record holds per-layer ranks" in capsys.readouterr().err
