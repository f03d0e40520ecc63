"""Start, wait for and stop TorchServe in an isolated run folder.

Everything TorchServe writes goes under the run folder: its config copy, logs
(``LOG_LOCATION``), metrics logs (``METRICS_LOCATION``), temporary files and the pid
file (``TMPDIR``), and the token key file (the working directory). One TorchServe
runs per run folder. Workers run this interpreter with the repository on
``PYTHONPATH``, so the handlers import :mod:`camserve`.

Readiness is read from the management API (a worker in state READY for every
model), never from ``/ping``, which answers Healthy while workers crash-loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "REPO_ROOT",
    "ServeConfig",
    "TorchServe",
    "TorchServeError",
    "free_port",
    "read_properties",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy" / "torchserve"
MODEL_DEFAULTS: dict[str, Any] = {
    "minWorkers": 1,
    "maxWorkers": 1,
    "batchSize": 8,
    "maxBatchDelay": 10,
    "responseTimeout": 120,
}
"""Settings of a model the config's ``models`` does not list."""


def _group_members(pgid: int) -> list[int]:
    """TorchServe processes (frontend, workers, wrapper) in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if (
            len(fields) > 2
            and int(fields[2]) == pgid
            and (
                b"org.pytorch.serve" in cmdline
                or b"model_service_worker" in cmdline
                or b"ts.model_server" in cmdline
            )
        ):
            members.append(int(entry.name))
    return members


class TorchServeError(RuntimeError):
    """TorchServe did not start, did not get ready, or did not stop."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def read_properties(path: Path) -> dict[str, str]:
    """A Java properties file as a dict (``key=value`` lines; ``#`` comments)."""
    props: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


@dataclass
class ServeConfig:
    """Where TorchServe listens and what it serves.

    Attributes:
        model_store: folder of ``.mar`` archives.
        run_dir: the run folder (created).
        host: the address every endpoint binds to (loopback by default).
        inference_port, management_port, metrics_port, grpc_inference_port,
        grpc_management_port: the ports.
        token_auth: TorchServe's token authorization (on by default; turn it off
            only on loopback, for development).
        models: the model names to load (default: every archive in the store).
        registrations: instead of ``models``, model name -> TorchServe settings
            with ``marName`` (one archive may be registered under several names).
        batch_size, max_batch_delay_ms: override the config's batching for every model.
        template: the project's ``config.properties``.
        metrics_yaml: the metrics YAML (declares the custom metrics).
    """

    model_store: Path = REPO_ROOT / "model_store"
    run_dir: Path = REPO_ROOT / "var" / "torchserve"
    host: str = "127.0.0.1"
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    token_auth: bool = True
    models: Sequence[str] | None = None
    batch_size: int | None = None
    max_batch_delay_ms: int | None = None
    registrations: Mapping[str, Mapping[str, Any]] | None = None
    template: Path = DEPLOY_DIR / "config.properties"
    metrics_yaml: Path = DEPLOY_DIR / "metrics.yaml"
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def free_ports(cls, **kwargs: Any) -> ServeConfig:
        """A config on five free loopback ports (tests, side-by-side runs)."""
        ports = {
            name: free_port()
            for name in (
                "inference_port",
                "management_port",
                "metrics_port",
                "grpc_inference_port",
                "grpc_management_port",
            )
        }
        return cls(**{**ports, **kwargs})


class TorchServe:
    """One TorchServe process tree in a run folder; usable as a context manager.

    Args:
        config: where and what to serve.
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.run_dir = config.run_dir.resolve()
        self.proc: subprocess.Popen[bytes] | None = None
        self.models: list[str] = []

    # --- addresses ---------------------------------------------------------------
    @property
    def inference_url(self) -> str:
        """Base URL of the REST inference API."""
        return f"http://{self.config.host}:{self.config.inference_port}"

    @property
    def management_url(self) -> str:
        """Base URL of the REST management API."""
        return f"http://{self.config.host}:{self.config.management_port}"

    @property
    def metrics_url(self) -> str:
        """URL of the Prometheus metrics endpoint."""
        return f"http://{self.config.host}:{self.config.metrics_port}/metrics"

    @property
    def grpc_target(self) -> str:
        """host:port of TorchServe's gRPC inference API."""
        return f"{self.config.host}:{self.config.grpc_inference_port}"

    @property
    def key_file(self) -> Path:
        """TorchServe's token file (written at start when token auth is on)."""
        return self.run_dir / "key_file.json"

    def token(self, kind: str = "inference") -> str | None:
        """The current ``inference`` or ``management`` key, or None without token auth."""
        if not self.config.token_auth:
            return None
        try:
            return str(json.loads(self.key_file.read_text())[kind]["key"])
        except (OSError, ValueError, KeyError):
            return None

    # --- files -------------------------------------------------------------------
    def _archives(self) -> list[str]:
        return sorted(p.stem for p in self.config.model_store.glob("*.mar"))

    def write_config(self) -> Path:
        """Writes the run's ``config.properties`` (absolute paths, chosen ports, models)."""
        cfg = self.config
        props = read_properties(cfg.template)
        template_models: dict[str, Any] = json.loads(props.get("models", "{}") or "{}")
        available = self._archives()
        wanted = list(cfg.models) if cfg.models is not None else available
        missing = [m for m in wanted if m not in available]
        if missing:
            raise TorchServeError(
                f"no archive for model(s) {missing} in {cfg.model_store}; "
                f"available: {available or 'none (run `camserve build-models`)'}"
            )
        if not wanted:
            raise TorchServeError(
                f"no .mar archives in {cfg.model_store}: run `camserve build-models` first"
            )
        models: dict[str, Any] = {}
        if cfg.registrations is not None:
            wanted = list(cfg.registrations)
            for reg in cfg.registrations.values():
                if not (cfg.model_store / str(reg["marName"])).exists():
                    raise TorchServeError(f"no archive {reg['marName']} in {cfg.model_store}")
        for name in wanted:
            entry = {**MODEL_DEFAULTS, **template_models.get(name, {}).get("1.0", {})}
            entry.update({"defaultVersion": True, "marName": f"{name}.mar"})
            if cfg.registrations is not None:
                entry.update(cfg.registrations[name])
            if cfg.batch_size is not None:
                entry["batchSize"] = cfg.batch_size
            if cfg.max_batch_delay_ms is not None:
                entry["maxBatchDelay"] = cfg.max_batch_delay_ms
            models[name] = {"1.0": entry}
        self.models = wanted
        props.update(
            {
                "inference_address": f"http://{cfg.host}:{cfg.inference_port}",
                "management_address": f"http://{cfg.host}:{cfg.management_port}",
                "metrics_address": f"http://{cfg.host}:{cfg.metrics_port}",
                "grpc_inference_address": cfg.host,
                "grpc_inference_port": str(cfg.grpc_inference_port),
                "grpc_management_address": cfg.host,
                "grpc_management_port": str(cfg.grpc_management_port),
                "model_store": str(cfg.model_store.resolve()),
                "metrics_config": str(cfg.metrics_yaml.resolve()),
                "load_models": ",".join(f"{m}={models[m]['1.0']['marName']}" for m in wanted),
                "models": json.dumps(models, separators=(",", ":")),
                "disable_token_authorization": "false" if cfg.token_auth else "true",
                **cfg.extra,
            }
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "config.properties"
        lines = ["# Written by camserve from deploy/torchserve/config.properties"]
        lines += [f"{k}={v}" for k, v in props.items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def env(self) -> dict[str, str]:
        """The environment TorchServe and its workers run in."""
        env = dict(os.environ)
        tmp = str(self.run_dir / "tmp")
        logs = str(self.run_dir / "logs")
        env.update(
            {
                "TMPDIR": tmp,
                "TEMP": tmp,
                "LOG_LOCATION": logs,
                "METRICS_LOCATION": logs,
                "PYTHONPATH": os.pathsep.join(
                    [str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH", "")] if p]
                ),
            }
        )
        env.pop("TS_CONFIG_FILE", None)
        return env

    def _pid_file(self) -> Path:
        return self.run_dir / "tmp" / ".model_server.pid"

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Starts TorchServe in the background (its own process group)."""
        if self.running_pid() is not None:
            raise TorchServeError(
                f"TorchServe already runs from {self.run_dir} (pid {self.running_pid()}); "
                "stop it first (`camserve stop`)"
            )
        config_path = self.write_config()
        (self.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "ts.model_server",
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(config_path),
            "--model-store",
            str(self.config.model_store.resolve()),
        ]
        if not self.config.token_auth:
            cmd.append("--disable-token-auth")
        out = (self.run_dir / "logs" / "launcher.log").open("ab")
        try:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.run_dir,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            out.close()
        # `camserve stop` from another process finds the group (workers included) here.
        (self.run_dir / "launcher.pgid").write_text(str(self.proc.pid))

    def _get(self, url: str, token: str | None) -> Any:
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def worker_status(self) -> dict[str, list[str]]:
        """Model name -> status of each of its workers (from the management API)."""
        token = self.token("management")
        out: dict[str, list[str]] = {}
        for name in self.models:
            try:
                info = self._get(f"{self.management_url}/models/{name}", token)
            except (urllib.error.URLError, OSError, ValueError):
                out[name] = []
                continue
            out[name] = [w.get("status", "") for v in info for w in v.get("workers", [])]
        return out

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Waits until every model has a READY worker.

        Raises:
            TorchServeError: TorchServe exited, or ``timeout`` seconds passed
                (the message holds the end of TorchServe's log).
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise TorchServeError(
                    f"TorchServe exited with code {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.config.token_auth and self.token("management") is None:
                status: dict[str, list[str]] = {}
            else:
                status = self.worker_status()
            if status and all("READY" in s for s in status.values()):
                return
            failed = self._failed_models()
            if failed:
                raise TorchServeError(f"TorchServe failed to load {failed}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TorchServeError(
                    f"workers not READY after {timeout:.0f} s ({status}):\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def _failed_models(self) -> list[str]:
        path = self.run_dir / "logs" / "ts_log.log"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return []
        marker = "Failed to load model: "
        return sorted(
            {line.split(marker, 1)[1].strip() for line in text.splitlines() if marker in line}
        )

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of TorchServe's logs (for error messages)."""
        parts = []
        for name in ("launcher.log", "ts_log.log", "model_log.log"):
            path = self.run_dir / "logs" / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts)

    def running_pid(self) -> int | None:
        """The pid of the TorchServe frontend of this run folder, if it runs."""
        try:
            pid = int(self._pid_file().read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"org.pytorch.serve.ModelServer" in cmdline else None

    def stop(self, timeout: float = 60.0) -> None:
        """Stops TorchServe and its workers; safe to call twice."""
        if self.running_pid() is not None:
            subprocess.run(
                [sys.executable, "-m", "ts.model_server", "--stop", "--foreground"],
                cwd=self.run_dir,
                env=self.env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        # Whatever is left in the group (a stuck JVM, orphaned workers) goes now.
        group = self._group()
        if group is not None:
            for pid in _group_members(group):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)
            self.proc = None
        (self.run_dir / "launcher.pgid").unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / "tmp", ignore_errors=True)

    def _group(self) -> int | None:
        if self.proc is not None:
            return self.proc.pid
        try:
            return int((self.run_dir / "launcher.pgid").read_text())
        except (OSError, ValueError):
            return None

    def serve_forever(self) -> int:
        """Waits for TorchServe to exit; SIGINT/SIGTERM stop it cleanly. Returns its exit code."""
        stopping = False

        def on_signal(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stopping and self.proc is not None and self.proc.poll() is None:
                time.sleep(0.5)
            code = 0 if stopping or self.proc is None else int(self.proc.returncode or 0)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.stop()
        return code

    def __enter__(self) -> TorchServe:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def curl_example(self, model: str, image: str = "image.png") -> str:
        """A ready-to-paste curl command for ``model``."""
        auth = ""
        token = self.token("inference")
        if token:
            auth = f' -H "Authorization: Bearer {token}"'
        return (
            f"curl -s{auth} -H 'Content-Type: image/png' -H 'X-Camserve-Methods: gradcam' "
            f"-H 'X-Camserve-Output: box' --data-binary @{image} "
            f"{self.inference_url}/predictions/{model}"
        )

    def describe(self) -> Mapping[str, str]:
        """Where everything is, for printing."""
        return {
            "inference (REST)": self.inference_url,
            "management (REST)": self.management_url,
            "metrics (Prometheus)": self.metrics_url,
            "inference (gRPC)": self.grpc_target,
            "run folder": str(self.run_dir),
            "token auth": (
                f"on, keys in {self.key_file}" if self.config.token_auth else "OFF (loopback only)"
            ),
        }
