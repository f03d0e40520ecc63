"""Model specs and their loaders: what camserve serves, from the zoo, a user or a package.

:class:`ModelSpec` describes a model; :func:`read_spec` / :func:`write_spec` /
:func:`bundle` handle spec files; :func:`load_model` builds the model of a spec;
:func:`resolve` finds a spec by file path, store name or built-in name.
"""

from camserve.models.files import (
    SPEC_FILE,
    SpecError,
    bundle,
    read_spec,
    spec_from_dict,
    write_spec,
)
from camserve.models.loading import (
    BUILTIN_SPECS,
    RUNTIMES,
    ExplainerFactory,
    LayerExplainer,
    LoadedModel,
    RuntimeBinding,
    load_model,
    resolve,
    word_tokenizer,
)
from camserve.models.spec import ModelKind, ModelSpec, Runtime, SpecLayout, layout_text

__all__ = [
    "BUILTIN_SPECS",
    "RUNTIMES",
    "SPEC_FILE",
    "ExplainerFactory",
    "LayerExplainer",
    "LoadedModel",
    "ModelKind",
    "ModelSpec",
    "Runtime",
    "RuntimeBinding",
    "SpecError",
    "SpecLayout",
    "bundle",
    "layout_text",
    "load_model",
    "read_spec",
    "resolve",
    "spec_from_dict",
    "word_tokenizer",
    "write_spec",
]
