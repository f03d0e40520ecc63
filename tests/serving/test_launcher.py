"""The launcher's files and the command line, without starting TorchServe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from camserve.cli import build_parser
from camserve.serving.launcher import ServeConfig, TorchServe, TorchServeError, read_properties


def store(tmp_path: Path, *names: str) -> Path:
    s = tmp_path / "store"
    s.mkdir()
    for n in names:
        (s / f"{n}.mar").write_bytes(b"")
    return s


def test_run_config_is_isolated_and_complete(tmp_path: Path) -> None:
    cfg = ServeConfig.free_ports(
        model_store=store(tmp_path, "a", "b"), run_dir=tmp_path / "run", batch_size=4
    )
    ts = TorchServe(cfg)
    props = read_properties(ts.write_config())
    assert props["inference_address"] == f"http://127.0.0.1:{cfg.inference_port}"
    assert props["grpc_inference_port"] == str(cfg.grpc_inference_port)
    assert props["metrics_mode"] == "prometheus"
    assert props["disable_token_authorization"] == "false"
    assert props["vmargs"] == "-Xmx512m -XX:-UsePerfData -XX:+UseSerialGC"
    assert Path(props["metrics_config"]).is_absolute()
    assert props["load_models"] == "a=a.mar,b=b.mar"
    models = json.loads(props["models"])
    assert models["a"]["1.0"]["batchSize"] == 4 and models["b"]["1.0"]["maxBatchDelay"] > 0
    env = ts.env()
    assert env["TMPDIR"].startswith(str(tmp_path / "run"))
    assert env["LOG_LOCATION"] == env["METRICS_LOCATION"] == str(tmp_path / "run" / "logs")
    assert "token auth" in ts.describe() and ts.token() is None


def test_token_auth_switch(tmp_path: Path) -> None:
    cfg = ServeConfig(model_store=store(tmp_path, "a"), run_dir=tmp_path / "run", token_auth=False)
    props = read_properties(TorchServe(cfg).write_config())
    assert props["disable_token_authorization"] == "true"


def test_missing_archives_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(TorchServeError, match="camserve build-models"):
        TorchServe(ServeConfig(model_store=store(tmp_path), run_dir=tmp_path / "r")).write_config()
    cfg = ServeConfig(model_store=tmp_path / "store", run_dir=tmp_path / "r", models=["zz"])
    with pytest.raises(TorchServeError, match=r"no archive for model\(s\) \['zz'\]"):
        TorchServe(cfg).write_config()


def test_stop_without_a_server_is_harmless(tmp_path: Path) -> None:
    ts = TorchServe(ServeConfig(run_dir=tmp_path / "run"))
    assert ts.running_pid() is None
    ts.stop()


def test_cli_subcommands() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--no-token-auth", "--port", "9000", "--batch-size", "2"])
    assert args.no_token_auth and args.port == 9000 and args.batch_size == 2
    assert parser.parse_args(["stop"]).func.__name__ == "_stop"
    assert parser.parse_args(["build-models", "--force"]).force
