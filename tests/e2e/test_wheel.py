"""An installed (non-editable) camserve explains, archives and serves from any folder.

The wheel is built from a copy of what the Dockerfile's wheel stage copies
(``pip wheel --no-deps``, as the image does) and installed into a fresh venv
outside the repository. So as not to download torch again, the venv sees the
test interpreter's site-packages through a ``.pth`` file (what
``--system-site-packages`` does for a base interpreter); camserve itself comes
from the wheel (the test checks it), and nothing puts the repository on
``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from camserve.torchserve.config import parse_properties

from .conftest import REPO_ROOT, STORE, free_run, model_of, scene_png

pytestmark = pytest.mark.slow

DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "Dockerfile"


def wheel_sources() -> list[str]:
    """What the Dockerfile's wheel stage copies from the repository (the same build here)."""
    stage = DOCKERFILE.read_text().split("\nFROM ")[1]
    sources = []
    for line in stage.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources += line.split()[1:-1]
    assert sources, f"no COPY in the first stage of {DOCKERFILE}"
    return sources


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    out = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert out.returncode == 0, f"{cmd}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with camserve installed from its wheel; returns its folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in wheel_sources():
        source = REPO_ROOT / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(source, src / name, symlinks=True, ignore=ignore)
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run(
        [*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist")],
        tmp,
        env,
    )
    wheel = next((tmp / "dist").glob("camserve-*.whl"))
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    py = venv / "bin" / "python"
    venv_site = Path(
        run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp, env
        ).strip()
    )
    (venv_site / "shared_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(
        [str(py), "-m", "pip", "install", "--no-deps", "--ignore-installed", str(wheel)],
        tmp,
        env,
    )
    return venv


def venv_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_installed_camserve_comes_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    out = run(
        [str(venv / "bin" / "python"), "-c", "import camserve, sys; print(camserve.__file__)"],
        tmp_path,
        venv_env(venv),
    )
    assert Path(out.strip()).resolve().is_relative_to(venv.resolve()), out


def test_installed_camserve_explains_archives_renders_and_serves(
    venv: Path, tmp_path: Path
) -> None:
    name = model_of("classifier")
    env = venv_env(venv)
    env["CAMSERVE_MODEL_STORE"] = "store"
    work = tmp_path / "elsewhere"
    store = work / "store"
    store.mkdir(parents=True)
    for suffix in (".toml", ".pt"):  # the model's spec and weights, as a user would have them
        shutil.copy(STORE / f"{name}{suffix}", store)
    image = work / "scene.png"
    image.write_bytes(scene_png()[0])
    camserve = str(venv / "bin" / "camserve")

    explain = [camserve, "explain", "scene.png", "--model", name, "--out", "out", "--quiet"]
    explain += ["--model-store", "store"]
    run(explain, work, env)
    report = json.loads((work / "out" / "explanations.json").read_text())
    assert report["results"][0]["predictions"], report
    assert list((work / "out").glob("*.png"))

    # --model archives the spec into the store; the config is rendered, nothing started.
    text = run([camserve, "serve", "--print-config", "--model", name], work, env)
    props = parse_properties(text[text.index("# Written") :])
    assert (store / f"{name}.mar").is_file()
    assert props["model_store"] == str(store) and props["load_models"] == f"{name}={name}.mar"
    assert Path(props["metrics_config"]).resolve().is_relative_to(venv.resolve())
    assert not (work / "var").exists()

    port, grpc_port = free_run(3), free_run(2) + 1000
    serve = [
        camserve,
        "serve",
        "--background",
        "--models",
        name,
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
    ]
    try:
        run(serve, work, env)
        key = json.loads((work / "var" / "torchserve" / "key_file.json").read_text())
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/predictions/{name}", data=scene_png()[0], method="POST"
        )
        req.add_header("Authorization", f"Bearer {key['inference']['key']}")
        req.add_header("Content-Type", "image/png")
        req.add_header("X-Camserve-Methods", "gradcam")
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        assert answer["model"] == name and answer["predictions"]
        assert "gradcam" in answer["explanations"][0]["maps"]
        pid = int((work / "var" / "torchserve" / "tmp" / ".model_server.pid").read_text())
        workers = psutil.Process(pid).children(recursive=True)
        assert workers
        for worker in workers:
            assert str(REPO_ROOT) not in worker.environ().get("PYTHONPATH", "")
            assert Path(worker.cmdline()[0]).parent == venv / "bin"
    finally:
        run([camserve, "stop"], work, env)
