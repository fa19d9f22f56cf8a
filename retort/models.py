"""The models of one run: each name's settings (the spec's, with the CLI's/API's targets over them),
its backend and its limiter, built once on first use, and the pre-flight check of endpoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from retort import backends
from retort.backends.base import Backend
from retort.errors import NotFoundError
from retort.limits import Limiter
from retort.spec import EmbedStage, ModelSpec, Pipeline, PromptStage, Source
from retort.workspace import Workspace


class Models:
    def __init__(self, pipeline: Pipeline, source: Source, workspace: Workspace, *,
                 targets: dict[str, dict[str, Any]] | None = None,
                 factory: Callable[[str, dict[str, Any]], Backend] | None = None) -> None:
        """`targets` override the spec's models by name (`*`: every one), as `--model` does."""
        self.spec, self.src, self.targets = pipeline, source, targets or {}
        self.factory = factory or (lambda name, config: backends.create(name, config, workspace))
        self._backends: dict[str, Backend] = {}
        self._limiters: dict[str, Limiter] = {}

    def config(self, name: str) -> dict[str, Any]:
        target = self.targets.get(name) or self.targets.get("*")
        try:
            spec = self.spec.model_for(name)
        except KeyError:
            if target is None:
                raise NotFoundError(f"{self.src.file}: no model named {name!r} "
                                    f"(models: {', '.join(self.spec.models) or 'default'})") from None
            spec = ModelSpec()
        config = spec.model_dump(exclude_none=True)
        if target:
            if target.get("backend") != config.get("backend"):  # another backend: only the served name carries
                keep = ("model",) if target.get("backend") in ("openai", "vllm") else ()
                config = {k: v for k, v in config.items() if k in keep}
            elif "base_url" in target:  # another endpoint: the spec's key is not sent to it
                config.pop("api_key_env", None)
            config.update(target)
        config.setdefault("backend", "local")
        config["name"] = name
        return config

    def backend(self, name: str) -> Backend:
        if name not in self._backends:
            config = self.config(name)
            self._backends[name] = backend = self.factory(name, config)
            self._limiters[name] = Limiter(int(backend.max_concurrency or 1), config.get("rpm"), config.get("tpm"),
                                           config.get("max_retry_after"))
        return self._backends[name]

    def limiter(self, name: str) -> Limiter:
        self.backend(name)
        return self._limiters[name]

    def check_targets(self) -> None:
        """A target for a model the pipeline does not name (in `models:`, a stage, or a param such as
        LbT M3's `students`) is a typo, not a no-op: `--model techer=...` would otherwise run the real
        teacher with nobody told."""
        if any(isinstance(stage, (PromptStage, EmbedStage)) and not isinstance(stage.model, str)
               for stage in self.spec.stages):
            return  # a model per row: its names come from the data (LbT's students), unknown until then
        named = [v for value in self.spec.params.values() for v in (value if isinstance(value, list) else [value])]
        known = {"*", "default", *self.spec.models, *self.used(), *(v for v in named if isinstance(v, str))}
        unknown = sorted(set(self.targets) - known)
        if unknown:
            raise NotFoundError(f"{self.src.file}: no model named {unknown[0]!r} to target "
                                f"(models: {', '.join(sorted(known - {'*'}))}; '*' targets every one)")

    def used(self) -> set[str]:
        """The models the pipeline's stages name (a per-row model names them in its column)."""
        return {stage.model for stage in self.spec.stages
                if isinstance(stage, (PromptStage, EmbedStage)) and isinstance(stage.model, str)}

    async def preflight(self, here: bool = True) -> None:
        """Fail fast, before any work, on an endpoint that refuses connections. `here=False`: this
        process makes no call (a plan, a validate, a run on Ray), so weights are not loaded to check."""
        for name in sorted(self.used()):
            if not here and self.config(name).get("backend") in ("local", "vllm"):
                continue  # checking would load the weights, for nothing
            backend = self.backend(name)
            served = await backend.check()
            if hasattr(backend, "use_model"):  # an endpoint named without a model: the one it serves
                backend.use_model(served)
            model = getattr(backend, "model", None)
            if served and model and model not in served:  # /v1/models answered: the name must be there
                urls = ", ".join(getattr(backend, "base_urls", []))
                raise NotFoundError(f"model {name!r}: {urls} does not serve {model!r} "
                                    f"(it serves: {', '.join(served[:10])})")

    async def aclose(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()
