"""Stand-in for `vllm.exceptions` (vLLM 0.33.0): the part of the error tree the tests raise."""


class VLLMError(Exception):
    pass


class VLLMClientError(VLLMError):
    pass


class VLLMServerError(VLLMError):
    pass


class VLLMValidationError(VLLMClientError):
    pass


class GenerationError(VLLMServerError):
    pass


class RetryableRequestError(GenerationError):
    """A transient request-level failure that is safe for clients to retry."""
