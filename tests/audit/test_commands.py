"""``camserve audit`` through the real command line entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from camserve.cli import main


def test_audit_command_with_a_config_file(zoo_store: Path, scenes_voc: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "audit.yaml"
    config.write_text("methods: [gradcam, gradcampp]\nmetrics: [pointing_game, deletion, alpha]\n"
                      "steps: 8\nchunk_size: 4\n")
    out = tmp_path / "out"
    code = main(["audit", str(scenes_voc), "--model", "resnet_gap", "--model-store",
                 str(zoo_store), "--out", str(out), "--config", str(config),
                 "--methods", "gradcampp", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "6 images scored, 0 skipped" in printed and "report.html" in printed
    summary = json.loads((out / "summary.json").read_text())
    # The flag overrides the config's methods; the rest comes from the file.
    assert summary["settings"]["methods"] == ["gradcampp"]
    assert summary["settings"]["steps"] == 8 and summary["settings"]["chunk_size"] == 4
    assert set(summary["methods"]["gradcampp"]) == {
        "pointing_game", "pointing_game_top5", "deletion_auc", "alpha"}
    assert (out / "report.html").stat().st_size > 1000


def test_audit_command_errors_name_the_value(zoo_store: Path, scenes_voc: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = ["audit", str(scenes_voc), "--model-store", str(zoo_store), "--out",
            str(tmp_path / "o"), "--no-progress"]
    assert main([*args, "--model", "nosuchmodel"]) == 2
    assert "nosuchmodel" in capsys.readouterr().err
    assert main([*args, "--model", "captioner"]) == 2
    assert "audits need a classifier" in capsys.readouterr().err
    assert main([*args, "--model", "resnet_gap", "--methods", "gradcamx"]) == 2
    assert "gradcamx" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("methodz: [gradcam]\n")
    assert main([*args, "--model", "resnet_gap", "--config", str(bad)]) == 2
    assert "methodz" in capsys.readouterr().err
