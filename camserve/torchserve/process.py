"""Start, wait for and stop TorchServe in an isolated run folder.

Everything TorchServe writes goes under the run folder: its config
(``config.properties``), logs (``LOG_LOCATION``), metrics logs
(``METRICS_LOCATION``), temporary files and the pid file (``TMPDIR``), and the
token key file (the working directory). One TorchServe runs per run folder.
Workers run this interpreter and import the camserve this process imported.

The process tree (launcher, JVM frontend, Python workers) lives in its own
process group. Stopping sends SIGTERM to the frontend (as ``torchserve --stop``
does; it stops its workers), waits, then kills whatever is left of the tree and
the group (psutil and :func:`os.killpg`). Readiness is read from the management
API (a READY worker for every model), never from ``/ping``, which answers Healthy
while workers crash-loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType, TracebackType

import psutil

import camserve
from camserve.torchserve.config import (
    ServeConfig,
    TorchServeError,
    parse_properties,
    render_config,
)
from camserve.torchserve.management import ManagementClient

__all__ = ["TorchServe", "TorchServeError", "stop_signals"]

_FRONTEND = "org.pytorch.serve.ModelServer"
_LAUNCHER_FILE = "launcher.json"


def _camserve_root() -> Path:
    """The folder this process imports camserve from (a checkout or site-packages)."""
    return Path(camserve.__file__).resolve().parents[1]


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Turns SIGTERM into :class:`KeyboardInterrupt` for the block (like Ctrl-C).

    So that a ``kill`` during start-up takes the same clean-up path as Ctrl-C
    instead of leaving TorchServe running in its own process group.
    """

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class TorchServe:
    """One TorchServe process tree in a run folder; usable as a context manager.

    Args:
        config: where and what to serve (relative paths against the working directory).
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config.resolved()
        self.run_dir = self.config.run_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.models: list[str] = []
        self.management = ManagementClient(self.management_url, lambda: self.token("management"))

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
    def render(self) -> str:
        """This run's ``config.properties`` (see :func:`~camserve.torchserve.config.render_config`).

        Raises:
            TorchServeError: a wanted model has no archive, or the store has none.
        """
        archives = [p.name for p in self.config.model_store.glob("*.mar")]
        return render_config(self.config, self.config.template.read_text(), archives)

    def write_config(self) -> Path:
        """Writes the run's ``config.properties``; sets :attr:`models`. Returns its path."""
        text = self.render()
        self.models = list(json.loads(parse_properties(text)["models"]))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "config.properties"
        path.write_text(text)
        return path

    def env(self) -> dict[str, str]:
        """The environment TorchServe and its workers run in.

        Workers import the camserve this process imported: its folder goes first on
        ``PYTHONPATH`` unless it is a site-packages folder the interpreter has anyway.
        """
        env = dict(os.environ)
        tmp = str(self.run_dir / "tmp")
        logs = str(self.run_dir / "logs")
        env.update({"TMPDIR": tmp, "TEMP": tmp, "LOG_LOCATION": logs, "METRICS_LOCATION": logs})
        root = str(_camserve_root())
        if root not in {str(Path(p).resolve()) for p in site.getsitepackages()}:
            env["PYTHONPATH"] = os.pathsep.join(
                [root] + [p for p in [env.get("PYTHONPATH", "")] if p]
            )
        env.pop("TS_CONFIG_FILE", None)
        return env

    def _pid_file(self) -> Path:
        return self.run_dir / "tmp" / ".model_server.pid"

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Starts TorchServe in the background, in a process group of its own.

        Raises:
            TorchServeError: one already runs from this run folder, or the config
                cannot be written (no archive for a model).
        """
        running = self.running_pid()
        if running is not None:
            raise TorchServeError(
                f"TorchServe already runs from {self.run_dir} (pid {running}); "
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
            str(self.config.model_store),
        ]
        if not self.config.token_auth:
            cmd.append("--disable-token-auth")
        with (self.run_dir / "logs" / "launcher.log").open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.run_dir,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        # `camserve stop` from another process finds the tree and its group here.
        launcher = psutil.Process(self.proc.pid)
        (self.run_dir / _LAUNCHER_FILE).write_text(
            json.dumps({"pid": launcher.pid, "create_time": launcher.create_time()})
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Waits until every model has a READY worker.

        Raises:
            TorchServeError: TorchServe exited, failed to load a model, or
                ``timeout`` seconds passed (the message holds the end of its logs).
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise TorchServeError(
                    f"TorchServe exited with code {self.proc.returncode}:\n{self.log_tail()}"
                )
            has_key = not self.config.token_auth or self.token("management") is not None
            if has_key and self.management.ready(self.models):
                return
            failed = self._failed_models()
            if failed:
                raise TorchServeError(f"TorchServe failed to load {failed}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                status = self.management.worker_status(self.models)
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

    def _frontend(self) -> psutil.Process | None:
        """The TorchServe frontend (JVM) of this run folder, from its pid file."""
        try:
            proc = psutil.Process(int(self._pid_file().read_text().split()[0]))
            return proc if _FRONTEND in proc.cmdline() else None
        except (OSError, ValueError, IndexError, psutil.Error):
            return None

    def _launcher(self) -> psutil.Process | None:
        """The launcher started by :meth:`start` (here or in another process), if alive."""
        try:
            info = json.loads((self.run_dir / _LAUNCHER_FILE).read_text())
            proc = psutil.Process(int(info["pid"]))
            if proc.create_time() != info["create_time"] or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            return None

    def running_pid(self) -> int | None:
        """The pid of the TorchServe frontend of this run folder, if it runs."""
        frontend = self._frontend()
        return None if frontend is None else frontend.pid

    def stop(self, timeout: float = 60.0) -> None:
        """Stops TorchServe and its workers; safe to call twice.

        SIGTERM to the frontend (as ``torchserve --stop`` does: it unloads its
        models and stops its workers; to the whole group if the frontend is not up
        yet), then SIGTERM and, after 5 s, SIGKILL to whatever of the tree is left.

        Args:
            timeout: seconds the frontend gets to shut down.
        """
        tree: dict[int, psutil.Process] = {}
        for root in (self._launcher(), self._frontend()):
            if root is not None:
                tree[root.pid] = root
                with contextlib.suppress(psutil.Error):
                    tree.update({p.pid: p for p in root.children(recursive=True)})
        group = self._group()
        frontend = self._frontend()
        if frontend is not None:
            with contextlib.suppress(psutil.Error):
                frontend.terminate()
            psutil.wait_procs([frontend], timeout=timeout)
        elif group is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGTERM)
        rest = [p for p in tree.values() if p.is_running()]
        for proc in rest:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(rest, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        if group is not None:
            # Anything of the group the tree walk missed (a worker forked meanwhile).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)
            self.proc = None
        (self.run_dir / _LAUNCHER_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / "tmp", ignore_errors=True)

    def _group(self) -> int | None:
        """The process group of the tree, when its launcher is known to be ours."""
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        launcher = self._launcher()
        return None if launcher is None else launcher.pid

    def serve_forever(self, ready: Callable[[], None] | None = None) -> int:
        """Waits for TorchServe to exit; SIGINT/SIGTERM stop it cleanly. Returns its exit code.

        Args:
            ready: called once the signal handlers are in place (the CLI prints
                "Ctrl-C stops it" there, so a signal right after that line is handled).
        """
        stopping = False

        def on_signal(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if ready is not None:
                ready()
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
