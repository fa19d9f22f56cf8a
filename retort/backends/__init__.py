"""Backends behind one contract (`base.Backend`); `create` builds one from a model spec.

Tests cannot reach a model by accident: when RETORT_ALLOWED_BACKENDS is set
(tests set it to `scripted`), any other backend refuses to be created.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from retort.backends.base import Backend, Completion, Request
from retort.errors import BackendError, UserError

if TYPE_CHECKING:
    from retort.spec import ModelSpec

__all__ = ["Backend", "Completion", "Request", "create", "parse_target", "settings"]

MODULES = {"local": "local", "openai": "openai", "scripted": "scripted", "vllm": "vllm", "langchain": "langchain"}

# An optional integration is an extra; each says which one when its package is missing.
# (The local and vllm backends import their packages when they load a model, with their own hints.)
LANGCHAIN_MISSING = 'the LangChain integration needs langchain-core: pip install "retort[langchain]"'


def create(name: str, config: dict[str, Any], workspace: Any = None) -> Backend:
    """Build the backend for model `name` from its settings: a pipeline's entry merged with any `--model`
    target (checked again here, since a target from Python or the command line was not in the file).
    `workspace` resolves the `module:attr` names that scripted and langchain models take (its
    evaluators/ folder first)."""
    model = settings(name, config)
    kind = model.backend
    allowed = os.environ.get("RETORT_ALLOWED_BACKENDS")
    if allowed and kind not in allowed.split(","):
        raise BackendError(f"backend {kind!r} is disabled here (RETORT_ALLOWED_BACKENDS={allowed}); "
                           "tests that need it say so with a marker", model=name)
    try:
        module = importlib.import_module(f"retort.backends.{MODULES[kind]}")
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "langchain_core":
            raise
        raise UserError(LANGCHAIN_MISSING) from None
    options = {key: value for key, value in model if value is not None}  # shallow: a chat model object stays one
    options["name"] = name
    if workspace is not None and kind in ("scripted", "langchain"):
        options["workspace"] = workspace
    return module.from_config(options)  # type: ignore[no-any-return]


def settings(name: str, config: dict[str, Any]) -> ModelSpec:
    """A model's settings as its backend's typed model (spec.LocalModel, OpenAIModel, ...); a key the
    backend does not take is a SpecError naming it. Keys set to None count as absent."""
    from pydantic import ValidationError

    from retort.spec import as_model, model_error

    given = {key: value for key, value in config.items() if value is not None and key not in ("name", "workspace")}
    try:
        return as_model(given)
    except ValidationError as exc:
        raise model_error(exc, name, given) from None


def parse_target(target: str) -> dict[str, Any]:
    """The `--model NAME=TARGET` short forms: point a named model at another backend.

        local                          the embedded llama.cpp model
        http://127.0.0.1:8000/v1       an OpenAI-compatible server (keeps the spec's model name)
        http://host/v1#served-name     ... serving another model name
        openai:gpt-4o-mini             api.openai.com, key from OPENAI_API_KEY
        scripted:module:function       replies from a function
        langchain:module:attr          a langchain-core chat model (or a factory of one)
    """
    if target == "local":
        return {"backend": "local"}
    if target.startswith(("http://", "https://")):
        url, _, model = target.partition("#")
        return {"backend": "openai", "base_url": url, **({"model": model} if model else {})}
    if target.startswith("openai:"):
        return {"backend": "openai", "model": target[7:], "base_url": "https://api.openai.com/v1",
                "api_key_env": "OPENAI_API_KEY"}
    if target.startswith("scripted:"):
        return {"backend": "scripted", "function": target[9:]}
    if target.startswith("langchain:"):
        return {"backend": "langchain", "factory": target[10:]}
    if target.startswith("vllm:"):
        return {"backend": "vllm", "model": target[5:]}
    raise UserError(f"--model target {target!r}: expected local, a URL, openai:MODEL, vllm:MODEL, "
                    "scripted:module:function or langchain:module:attr")
