"""TorchServe's config.properties rendered as a pure function, and the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from camserve.cli import build_parser, main
from camserve.torchserve import resources
from camserve.torchserve.config import (
    ServeConfig,
    TorchServeError,
    parse_properties,
    read_properties,
    render_config,
)
from camserve.torchserve.process import TorchServe

from .user_model import MODULE, NAME, write_user_model

TEMPLATE = resources.config_template().read_text()


def render(archives: list[str], **kwargs: Any) -> dict[str, str]:
    config = ServeConfig(model_store=Path("/srv/store"), **kwargs)
    return parse_properties(render_config(config, TEMPLATE, archives))


def test_render_replaces_addresses_store_and_models() -> None:
    props = render(
        ["a.mar", "b.mar", "notes.txt"],
        inference_port=9000,
        management_port=9001,
        metrics_port=9002,
        grpc_inference_port=9100,
        grpc_management_port=9101,
        batch_size=4,
    )
    assert props["inference_address"] == "http://127.0.0.1:9000"
    assert props["management_address"] == "http://127.0.0.1:9001"
    assert props["metrics_address"] == "http://127.0.0.1:9002"
    assert props["grpc_inference_port"] == "9100" and props["grpc_management_port"] == "9101"
    assert props["model_store"] == "/srv/store"
    assert props["load_models"] == "a=a.mar,b=b.mar"
    models = json.loads(props["models"])
    assert set(models) == {"a", "b"}
    assert models["a"]["1.0"]["batchSize"] == 4 and models["b"]["1.0"]["maxBatchDelay"] > 0
    assert models["a"]["1.0"]["marName"] == "a.mar" and models["a"]["1.0"]["defaultVersion"]
    # The template's other keys are kept as written.
    assert props["metrics_mode"] == "prometheus"
    assert props["vmargs"] == "-Xmx512m -XX:-UsePerfData -XX:+UseSerialGC"
    assert props["disable_token_authorization"] == "false"
    assert props["metrics_config"] == str(resources.metrics_yaml())


def test_render_is_pure_and_selects_models() -> None:
    text = render_config(ServeConfig(models=["b"]), TEMPLATE, ["a.mar", "b.mar"])
    assert text == render_config(ServeConfig(models=["b"]), TEMPLATE, ["a.mar", "b.mar"])
    assert parse_properties(text)["load_models"] == "b=b.mar"


def test_template_batching_is_kept_unless_overridden() -> None:
    template = TEMPLATE + '\nmodels={"a":{"1.0":{"batchSize":2,"maxBatchDelay":7}}}\n'
    config = ServeConfig()
    models = json.loads(parse_properties(render_config(config, template, ["a.mar"]))["models"])
    assert models["a"]["1.0"]["batchSize"] == 2 and models["a"]["1.0"]["maxBatchDelay"] == 7
    config = ServeConfig(max_batch_delay_ms=1)
    models = json.loads(parse_properties(render_config(config, template, ["a.mar"]))["models"])
    assert models["a"]["1.0"]["batchSize"] == 2 and models["a"]["1.0"]["maxBatchDelay"] == 1


def test_registrations_serve_one_archive_under_several_names() -> None:
    regs = {"x": {"marName": "a.mar", "batchSize": 1}, "y": {"marName": "a.mar"}}
    props = render(["a.mar"], registrations=regs)
    assert props["load_models"] == "x=a.mar,y=a.mar"
    assert json.loads(props["models"])["x"]["1.0"]["batchSize"] == 1
    with pytest.raises(TorchServeError, match=r"no archive b\.mar"):
        render(["a.mar"], registrations={"x": {"marName": "b.mar"}})


def test_token_auth_switch_and_extra() -> None:
    props = render(["a.mar"], token_auth=False, extra={"max_request_size": "100"})
    assert props["disable_token_authorization"] == "true"
    assert props["max_request_size"] == "100"


def test_missing_archives_name_the_fix() -> None:
    with pytest.raises(TorchServeError, match="camserve build-models"):
        render([])
    with pytest.raises(TorchServeError, match=r"no archive for model\(s\) \['zz'\]"):
        render(["a.mar"], models=["zz"])


def test_relative_paths_resolve_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = ServeConfig().resolved()
    assert config.model_store == tmp_path / "model_store"
    assert config.run_dir == tmp_path / "var" / "torchserve"
    assert config.template == resources.config_template().resolve()


def test_write_config_in_the_run_folder(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.mar").write_bytes(b"")
    ts = TorchServe(ServeConfig.free_ports(model_store=store, run_dir=tmp_path / "run"))
    props = read_properties(ts.write_config())
    assert ts.models == ["a"]
    assert props["model_store"] == str(store)
    assert Path(props["metrics_config"]).is_absolute()
    assert props["inference_address"] == f"http://127.0.0.1:{ts.config.inference_port}"


def test_packaged_files_exist() -> None:
    for kind in resources.HANDLER_FILES:
        assert resources.handler_file(kind).read_text().startswith('"""TorchServe handler')
    assert "class CamserveHandler" in resources.handler_base_file().read_text()
    assert "model_metrics" in resources.metrics_yaml().read_text()
    with pytest.raises(KeyError):
        resources.handler_file("detector")


def test_cli_subcommands() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--no-token-auth", "--port", "9000", "--batch-size", "2"])
    assert args.no_token_auth and args.port == 9000 and args.batch_size == 2
    assert args.model_store is None and args.run_dir is None  # the settings decide
    assert parser.parse_args(["stop"]).func.__name__ == "_stop"
    assert parser.parse_args(["build-models", "--force"]).force


def test_cli_print_config_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.mar").write_bytes(b"")
    run = tmp_path / "run"
    argv = ["serve", "--print-config", "--model-store", str(store), "--run-dir", str(run)]
    assert main([*argv, "--port", "9000"]) == 0
    props = parse_properties(capsys.readouterr().out)
    assert props["inference_address"] == "http://127.0.0.1:9000"
    assert props["management_address"] == "http://127.0.0.1:9001"
    assert props["load_models"] == "a=a.mar"
    assert not run.exists()
    assert main([*argv, "--models", "zz"]) == 1
    assert "no archive for model(s) ['zz']" in capsys.readouterr().err


def test_cli_model_spec_is_checked_archived_and_served(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    user = tmp_path / "user"
    good = write_user_model(user)
    monkeypatch.syspath_prepend(str(user))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    store = tmp_path / "store"
    argv = ["serve", "--print-config", "--model-store", str(store), "--run-dir", str(tmp_path)]
    # Alone (--models <its name>): archived into the store and the only model served.
    assert main([*argv, "--model", str(good), "--models", NAME]) == 0
    out = capsys.readouterr().out
    assert (store / f"{NAME}.mar").is_file()
    assert parse_properties(out[out.index("# Written") :])["load_models"] == f"{NAME}={NAME}.mar"

    bad = write_user_model(tmp_path / "bad", layer="features.9")
    (store / f"{NAME}.mar").unlink()
    assert main([*argv, "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "'layer'" in err and "features.9" in err
    assert not (store / f"{NAME}.mar").exists()
    assert main([*argv, "--model", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert "no_such_model" in err and "efficientnet_lite0" in err


def test_cli_folders_come_from_the_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.mar").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAMSERVE_MODEL_STORE", "store")
    monkeypatch.setenv("CAMSERVE_RUN_DIR", "state")
    assert main(["serve", "--print-config"]) == 0
    assert parse_properties(capsys.readouterr().out)["model_store"] == str(store)
    ts = TorchServe(ServeConfig(run_dir=tmp_path / "state" / "torchserve"))
    assert main(["stop"]) == 0
    assert f"no TorchServe runs from {ts.run_dir}" in capsys.readouterr().out
    monkeypatch.setenv("CAMSERVE_MAX_METHODS", "zero")
    assert main(["serve", "--print-config"]) == 2
    assert "max_methods" in capsys.readouterr().err
