"""Settings: defaults, a TOML or YAML file, the environment, errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from camserve.errors import InvalidRequestError
from camserve.service import Settings, load_settings


def test_defaults_are_relative_to_the_working_directory() -> None:
    s = Settings()
    assert s.max_image_bytes == 6_000_000 and s.max_image_pixels == 16_000_000
    assert s.max_methods == 8 and s.max_targets == 20 and s.device == "auto"
    assert s.model_store == Path("model_store") and s.run_dir == Path("var")
    assert not s.model_store.is_absolute()


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_file_then_environment_then_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    path = tmp_path / f"camserve{suffix}"
    if suffix == ".toml":
        path.write_text('max_methods = 4\nmax_batch_size = 16\ndevice = "cpu"\n')
    else:
        path.write_text("max_methods: 4\nmax_batch_size: 16\ndevice: cpu\n")
    s = load_settings(path)
    assert (s.max_methods, s.max_batch_size, s.device) == (4, 16, "cpu")
    monkeypatch.setenv("CAMSERVE_MAX_BATCH_SIZE", "32")
    s = load_settings(path)
    assert (s.max_methods, s.max_batch_size) == (4, 32)  # the environment wins over the file
    assert load_settings(path, max_methods=2).max_methods == 2  # arguments win over both
    monkeypatch.setenv("CAMSERVE_SETTINGS_FILE", str(path))
    assert load_settings().max_methods == 4
    assert s.torch_device() == "cpu"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("max_methods = 0\n", "setting 'max_methods': Input should be greater than or equal to 1"),
        ('max_methods = "many"\n', "setting 'max_methods'"),
        ("colour = 1\n", "setting 'colour': Extra inputs are not permitted"),
    ],
)
def test_bad_settings_name_the_field(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(InvalidRequestError, match=needle):
        load_settings(path)


def test_missing_or_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")
    (tmp_path / "s.ini").write_text("x")
    with pytest.raises(InvalidRequestError, match=r"unknown suffix '\.ini'"):
        load_settings(tmp_path / "s.ini")
