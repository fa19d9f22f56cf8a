"""Stand-in for `vllm.v1.engine.exceptions` (vLLM 0.33.0)."""

from vllm.exceptions import VLLMServerError


class EngineDeadError(VLLMServerError):
    """Raised when the EngineCore dies. Unrecoverable."""
