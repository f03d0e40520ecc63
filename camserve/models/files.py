"""Model spec files (TOML or YAML): reading, writing, bundling.

A spec file holds the fields of :class:`~camserve.models.spec.ModelSpec`, plus
``labels_file`` / ``vocab_file`` (one entry per line, or a JSON list) read into
``labels`` / ``vocab``. Relative paths are relative to the file's folder::

    name = "my_resnet"
    kind = "classifier"
    layer = "layer4"
    input_size = [3, 224, 224]
    mean = [0.485, 0.456, 0.406]
    std = [0.229, 0.224, 0.225]
    labels_file = "labels.txt"
    factory = "my_package.nets:resnet"
    weights = "resnet.pt"

    [factory_kwargs]
    num_classes = 10

``layout`` says how the explained layers' outputs are read: ``"auto"`` (the
default), ``"channels_first"``, ``"channels_last"`` (Swin's ``(N, h, w, C)``),
or a table for a token layer ``(N, prefix + h * w, C)`` (ViT, DeiT, register
tokens)::

    layer = "blocks.11.norm1"

    [layout]
    prefix = 1        # the class token; leave out to detect it
    grid = [14, 14]   # leave out to derive it from the input's aspect ratio
"""

from __future__ import annotations

import json
import math
import shutil
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w
import yaml

from camserve.engine.layout import TokenGrid
from camserve.errors import InvalidRequestError
from camserve.models.spec import LAYOUT_NAMES, ModelSpec, SpecLayout

__all__ = ["SPEC_FIELDS", "SpecError", "bundle", "read_spec", "spec_from_dict", "write_spec"]

SPEC_FILE = "model.toml"
"""The spec's name inside a bundle (and an archive)."""

SPEC_FIELDS = (
    "name",
    "kind",
    "layer",
    "input_size",
    "mean",
    "std",
    "labels",
    "labels_file",
    "vocab",
    "vocab_file",
    "factory",
    "factory_kwargs",
    "weights",
    "program",
    "onnx",
    "runtime",
    "layout",
    "extra",
)
"""Every field a spec file may have."""
_KINDS = ("classifier", "captioner", "vqa")
_RUNTIMES = ("torch", "onnx")
_PATHS = ("weights", "program", "onnx")


class SpecError(InvalidRequestError):
    """A wrong model spec: an unknown field, a bad value, a missing file, weights that do not fit.

    Args:
        field: the spec field at fault.
        value: its value.
        problem: what is wrong with it.
        origin: the spec file, if any.
    """

    def __init__(self, field: str, value: object, problem: str, origin: Path | None = None) -> None:
        self.field = field
        self.value = value
        where = f"model spec {str(origin)!r}: " if origin is not None else "model spec: "
        super().__init__(f"{where}field {field!r} = {value!r}: {problem}")


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError("path", str(path), "no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data: object = tomllib.loads(path.read_text())
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(path.read_text())
        else:
            raise SpecError("path", str(path), "a spec file ends in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise SpecError("path", str(path), f"not valid {suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError("path", str(path), "the file must hold a table of fields")
    return data


def _text_list(path: Path) -> tuple[str, ...]:
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
            raise ValueError("a JSON labels file holds a list of strings")
        return tuple(data)
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _strings(field: str, value: object, origin: Path | None) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise SpecError(field, value, "must be a list of strings", origin)
    return tuple(value)


def _floats3(field: str, value: object, origin: Path | None) -> tuple[float, float, float]:
    items = list(value) if isinstance(value, list | tuple) else []
    ok = len(items) == 3 and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in items
    )
    if not ok:
        raise SpecError(field, value, "must be a list of 3 finite numbers", origin)
    return float(items[0]), float(items[1]), float(items[2])


def _layout(value: object, origin: Path | None) -> SpecLayout:
    if isinstance(value, str):
        if value not in LAYOUT_NAMES:
            raise SpecError(
                "layout",
                value,
                f"valid layouts: {', '.join(LAYOUT_NAMES)}, or a table with prefix and grid",
                origin,
            )
        return value  # type: ignore[return-value]  # one of LAYOUT_NAMES
    if not isinstance(value, dict):
        raise SpecError("layout", value, "must be a layout name or a table", origin)
    unknown = sorted(set(value) - {"prefix", "grid"})
    if unknown:
        raise SpecError(
            "layout", value, f"unknown key(s) {unknown}; a token layout has prefix and grid", origin
        )
    prefix = value.get("prefix")
    if prefix is not None and (
        not isinstance(prefix, int) or isinstance(prefix, bool) or prefix < 0
    ):
        raise SpecError("layout.prefix", prefix, "must be a non-negative integer", origin)
    grid = value.get("grid")
    if grid is not None and (
        not isinstance(grid, list | tuple)
        or len(grid) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)
    ):
        raise SpecError("layout.grid", grid, "must be [height, width] of positive integers", origin)
    return TokenGrid(prefix=prefix, grid=None if grid is None else (int(grid[0]), int(grid[1])))


def _layout_value(layout: SpecLayout) -> str | dict[str, Any]:
    if isinstance(layout, str):
        return layout
    table: dict[str, Any] = {}
    if layout.prefix is not None:
        table["prefix"] = layout.prefix
    if layout.grid is not None:
        table["grid"] = list(layout.grid)
    return table


def spec_from_dict(data: Mapping[str, Any], origin: Path | None = None) -> ModelSpec:
    """A :class:`ModelSpec` from a spec file's table; paths resolved against ``origin``'s folder.

    Raises:
        SpecError: an unknown field, a missing required field, a value of the
            wrong type or range, a missing file (the message names the field and
            the value).
    """
    for key in data:
        if key not in SPEC_FIELDS:
            raise SpecError(
                key, data[key], f"unknown field; valid fields: {', '.join(SPEC_FIELDS)}", origin
            )
    for key in ("name", "kind", "layer", "input_size"):
        if key not in data:
            raise SpecError(key, None, "required field is missing", origin)
    base = origin.parent if origin is not None else Path.cwd()
    out: dict[str, Any] = {"origin": origin}
    for key in ("name", "layer"):
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            raise SpecError(key, value, "must be a non-empty string", origin)
        out[key] = value
    if data["kind"] not in _KINDS:
        raise SpecError("kind", data["kind"], f"valid kinds: {', '.join(_KINDS)}", origin)
    out["kind"] = data["kind"]
    size = data["input_size"]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        or size[0] != 3
    ):
        raise SpecError(
            "input_size", size, "must be [3, height, width] of positive integers", origin
        )
    out["input_size"] = (int(size[0]), int(size[1]), int(size[2]))
    for key in ("mean", "std"):
        if key in data:
            out[key] = _floats3(key, data[key], origin)
    if "std" in out and any(v <= 0 for v in out["std"]):
        raise SpecError("std", data["std"], "must be positive", origin)
    for key in ("labels", "vocab"):
        if key in data and f"{key}_file" in data:
            raise SpecError(
                f"{key}_file", data[f"{key}_file"], f"give {key} or {key}_file, not both", origin
            )
        if key in data:
            out[key] = _strings(key, data[key], origin)
        elif f"{key}_file" in data:
            value = data[f"{key}_file"]
            if not isinstance(value, str):
                raise SpecError(f"{key}_file", value, "must be a file path", origin)
            path = (base / value).resolve()
            if not path.is_file():
                raise SpecError(f"{key}_file", value, f"no such file ({path})", origin)
            try:
                out[key] = _text_list(path)
            except (ValueError, UnicodeDecodeError) as exc:
                raise SpecError(f"{key}_file", value, str(exc), origin) from exc
    for key in ("factory", *_PATHS):
        if key in data and data[key] is not None and not isinstance(data[key], str):
            raise SpecError(key, data[key], "must be a string", origin)
    factory = data.get("factory")
    if factory is not None:
        module, _, func = factory.partition(":")
        if not module or not func:
            raise SpecError("factory", factory, "must be 'package.module:function'", origin)
        out["factory"] = factory
    for key in _PATHS:
        value = data.get(key)
        if value is None:
            continue
        path = (base / value).resolve()
        if not path.is_file():
            raise SpecError(key, value, f"no such file ({path})", origin)
        out[key] = path
    has_factory, has_program = "factory" in out, "program" in out
    onnx_alone = data.get("runtime") == "onnx" and "onnx" in out
    if has_factory == has_program and not (onnx_alone and not has_factory):
        raise SpecError(
            "factory",
            factory,
            "give exactly one source: a factory or a program file (or, for a classifier "
            "with runtime onnx, the onnx file alone)",
            origin,
        )
    if "weights" in out and "factory" not in out:
        raise SpecError("weights", data["weights"], "weights go with a factory", origin)
    for key in ("factory_kwargs", "extra"):
        if key in data:
            if not isinstance(data[key], dict):
                raise SpecError(key, data[key], "must be a table", origin)
            out[key] = dict(data[key])
    runtime = data.get("runtime", "torch")
    if runtime not in _RUNTIMES:
        raise SpecError("runtime", runtime, f"valid runtimes: {', '.join(_RUNTIMES)}", origin)
    if runtime == "onnx" and "onnx" not in out:
        raise SpecError("runtime", runtime, "the onnx runtime needs an onnx file", origin)
    out["runtime"] = runtime
    if "layout" in data:
        out["layout"] = _layout(data["layout"], origin)
    kind = out["kind"]
    if kind in ("classifier", "vqa") and not out.get("labels"):
        raise SpecError(
            "labels", out.get("labels"), f"a {kind} needs labels (or labels_file)", origin
        )
    if kind in ("captioner", "vqa") and not out.get("vocab"):
        raise SpecError("vocab", out.get("vocab"), f"a {kind} needs vocab (or vocab_file)", origin)
    return ModelSpec(**out)


def read_spec(path: str | Path) -> ModelSpec:
    """Reads a model spec file (``.toml``, ``.yaml`` or ``.yml``).

    Raises:
        SpecError: a missing or malformed file, an unknown field, a bad value, a
            file it names that does not exist.
    """
    p = Path(path).resolve()
    return spec_from_dict(_load(p), origin=p)


def _as_table(spec: ModelSpec, paths: Mapping[str, str]) -> dict[str, Any]:
    table: dict[str, Any] = {
        "name": spec.name,
        "kind": spec.kind,
        "layer": spec.layer,
        "input_size": list(spec.input_size),
        "mean": list(spec.mean),
        "std": list(spec.std),
        "runtime": spec.runtime,
        "layout": _layout_value(spec.layout),
    }
    if spec.labels:
        table["labels"] = list(spec.labels)
    if spec.vocab:
        table["vocab"] = list(spec.vocab)
    if spec.factory is not None:
        table["factory"] = spec.factory
    table.update(paths)
    if spec.factory_kwargs:
        table["factory_kwargs"] = dict(spec.factory_kwargs)
    if spec.extra:
        table["extra"] = dict(spec.extra)
    return table


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def write_spec(spec: ModelSpec, path: str | Path) -> Path:
    """Writes ``spec`` as a TOML or YAML file (by the suffix); paths relative to its folder.

    Returns:
        The path written.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    paths = {
        key: _relative(value, p.parent)
        for key in _PATHS
        if (value := getattr(spec, key)) is not None
    }
    table = _as_table(spec, paths)
    if p.suffix.lower() == ".toml":
        p.write_text(tomli_w.dumps(table))
    elif p.suffix.lower() in (".yaml", ".yml"):
        p.write_text(yaml.safe_dump(table, sort_keys=False))
    else:
        raise SpecError("path", str(p), "a spec file ends in .toml, .yaml or .yml")
    return p


def bundle(spec: ModelSpec, folder: str | Path) -> Path:
    """Copies every file ``spec`` references into ``folder`` and writes ``folder/model.toml``.

    The bundle is self-contained (files referenced by basename): what goes into
    an archive.

    Returns:
        The path of the bundle's ``model.toml``.

    Raises:
        SpecError: two referenced files with one basename, or a missing file.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    for key in _PATHS:
        src = getattr(spec, key)
        if src is None:
            continue
        src = Path(src)
        if not src.is_file():
            raise SpecError(key, str(src), "no such file", spec.origin)
        if src.name in paths.values():
            raise SpecError(key, str(src), "another referenced file has the same name", spec.origin)
        shutil.copy2(src, out / src.name)
        paths[key] = src.name
    target = out / SPEC_FILE
    target.write_text(tomli_w.dumps(_as_table(spec, paths)))
    return target
