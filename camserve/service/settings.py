"""camserve's settings: one object, from defaults, a TOML/YAML file and the environment.

Precedence (highest first): keyword arguments, environment variables
``CAMSERVE_<NAME>`` (``CAMSERVE_MAX_IMAGE_BYTES=1000000``), the settings file
(``load_settings(path)``, or the file named by ``CAMSERVE_SETTINGS_FILE``; TOML
or YAML by its suffix, keys as the field names), then the defaults below. Paths
are relative to the working directory, never to camserve's installation.

Every field and its default is listed in the README's "Settings" table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from camserve.errors import InvalidRequestError
from camserve.service.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_METHODS",
    "DEFAULT_MAX_TARGETS",
    "SETTINGS_FILE_ENV",
    "Settings",
    "load_settings",
]

DEFAULT_MAX_IMAGE_BYTES = DEFAULT_MAX_BYTES
"""Largest encoded image accepted (below TorchServe's 6,553,500-byte request cap)."""
DEFAULT_MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
"""Largest decoded image accepted, in pixels (width x height)."""
DEFAULT_MAX_METHODS = 8
"""Most method ids in one request."""
DEFAULT_MAX_TARGETS = 20
"""Most explained targets in one request (top-k, class ids + labels, answers)."""
SETTINGS_FILE_ENV = "CAMSERVE_SETTINGS_FILE"
"""Environment variable naming a settings file read by :func:`load_settings`."""


class Settings(BaseSettings):
    """Limits, device and folders of a camserve process.

    Attributes:
        max_image_bytes: largest encoded image, bytes.
        max_image_pixels: largest decoded image, width x height.
        max_methods: most method ids per request.
        max_targets: most targets (top-k, class ids + labels, answers) per request.
        max_batch_size: most requests one engine call explains together; larger
            groups are split.
        predictions: how many ranked classes / answers every result lists
            (at least as many as the explained targets).
        request_timeout_s: seconds a front door gives a request without a deadline.
        device: ``auto`` (the first CUDA device if there is one, else the CPU),
            ``cpu``, ``cuda`` or ``cuda:N``.
        model_store: the folder of model specs, weights and archives.
        run_dir: the folder for logs, pid files and other run-time state.
    """

    model_config = SettingsConfigDict(env_prefix="CAMSERVE_", extra="forbid", frozen=True)

    max_image_bytes: Annotated[int, Field(ge=1)] = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: Annotated[int, Field(ge=1)] = DEFAULT_MAX_IMAGE_PIXELS
    max_methods: Annotated[int, Field(ge=1)] = DEFAULT_MAX_METHODS
    max_targets: Annotated[int, Field(ge=1)] = DEFAULT_MAX_TARGETS
    max_batch_size: Annotated[int, Field(ge=1)] = 64
    predictions: Annotated[int, Field(ge=1)] = 5
    request_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    device: str = "auto"
    model_store: Path = Path("model_store")
    run_dir: Path = Path("var")

    def torch_device(self) -> str:
        """The torch device name :attr:`device` stands for (``auto`` resolved)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def _file_source(path: Path, settings_cls: type[BaseSettings]) -> PydanticBaseSettingsSource:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    raise InvalidRequestError(
        f"settings file {str(path)!r}: unknown suffix {suffix!r}; "
        "valid suffixes: .toml, .yaml, .yml"
    )


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """The settings from a file, the environment and ``overrides``.

    Args:
        path: a TOML or YAML file of settings; None reads ``$CAMSERVE_SETTINGS_FILE``
            if it is set, else no file.
        overrides: field values that win over everything else.

    Raises:
        InvalidRequestError: a missing file, an unknown key or a bad value (the
            message names the field and the value).
    """
    if path is None:
        env = os.environ.get(SETTINGS_FILE_ENV)
        path = Path(env) if env else None
    try:
        if path is None:
            return Settings(**overrides)
        file = Path(path)
        if not file.is_file():
            raise InvalidRequestError(f"settings file {str(file)!r} does not exist")

        class _FromFile(Settings):
            @classmethod
            def settings_customise_sources(
                cls,
                settings_cls: type[BaseSettings],
                init_settings: PydanticBaseSettingsSource,
                env_settings: PydanticBaseSettingsSource,
                dotenv_settings: PydanticBaseSettingsSource,
                file_secret_settings: PydanticBaseSettingsSource,
            ) -> tuple[PydanticBaseSettingsSource, ...]:
                return init_settings, env_settings, _file_source(file, settings_cls)

        return Settings.model_validate(_FromFile(**overrides).model_dump())
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise InvalidRequestError(
            f"setting {field!r}: {err['msg']} (got {err.get('input')!r})"
        ) from exc
