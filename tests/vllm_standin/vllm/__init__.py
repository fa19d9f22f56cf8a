"""A stand-in for vllm, mirroring the documented API of vLLM 0.33.0; not vLLM.

The tests put this folder on sys.path, so `import vllm` finds this module. It loads
no model and generates no text with one. It has the signatures that
retort/backends/vllm.py calls, copied from vLLM 0.33.0's own source
(vllm/entrypoints/llm.py, vllm/sampling_params.py, vllm/outputs.py), and it
records every call, so tests can check what the backend asks of vLLM:

    LLM(model, **engine_args)
    LLM.chat(messages, sampling_params=None, use_tqdm=True, ..., chat_template=None,
             add_generation_prompt=True, continue_final_message=False, ...) -> list[RequestOutput]
    LLM.get_default_sampling_params() -> SamplingParams   (engine arg override_generation_config)
    SamplingParams(...), StructuredOutputsParams(...)      (vllm.sampling_params; unknown names are refused)

Behaviour the tests steer:
- `LLM.instances` holds every LLM built; `llm.calls` holds every chat call (ChatCall).
- A model id starting with "missing/" fails to load with OSError, as an unknown
  Hugging Face repo does.
- A message containing "<too long>" makes `chat` raise VLLMValidationError and
  abort the whole call, as vLLM does for a prompt longer than max_model_len.
  "<engine dead>" raises EngineDeadError; "<retry>" raises RetryableRequestError;
  "<finish error>" returns an output whose finish_reason is "error".
- `REPLY(conversation, sampling_params, sample_index) -> str | None` may be set by
  a test. With None, the built-in replies are used: a small JSON instance of the
  schema under structured_outputs.json, one of structured_outputs.choice, or else
  "stand-in reply K to: ...". A reply is cut at max_tokens (one word is one token),
  and its finish_reason is then "length".
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from vllm.exceptions import RetryableRequestError, VLLMValidationError
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams, StructuredOutputsParams
from vllm.v1.engine.exceptions import EngineDeadError

__version__ = "0.33.0+standin"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "StructuredOutputsParams"]

Conversation = list[dict[str, Any]]

REPLY: Callable[[Conversation, SamplingParams, int], str | None] | None = None


@dataclass
class ChatCall:
    messages: list[Conversation]
    sampling_params: list[SamplingParams]
    use_tqdm: Any
    chat_template: str | None
    add_generation_prompt: bool
    continue_final_message: bool
    thread: str


class LLM:
    instances: ClassVar[list[LLM]] = []

    def __init__(self, model: str, **kwargs: Any) -> None:
        if model.startswith("missing/"):
            raise OSError(f"{model} is not a local folder and is not a valid model identifier listed on "
                          "'https://huggingface.co/models'")
        self.model = model
        self.engine_args = kwargs
        self.calls: list[ChatCall] = []
        self.thread = threading.current_thread().name
        self._counter = 0
        LLM.instances.append(self)

    def get_default_sampling_params(self) -> SamplingParams:
        config = dict(self.engine_args.get("override_generation_config") or {})
        if "max_new_tokens" in config:
            config["max_tokens"] = config.pop("max_new_tokens")
        return SamplingParams.from_optional(**config) if config else SamplingParams()

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: Any = True, lora_request: Any = None, priority: Any = None,
             chat_template: str | None = None, chat_template_content_format: str = "auto",
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
             tokenization_kwargs: dict[str, Any] | None = None,
             mm_processor_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        conversations: list[Conversation] = (
            [messages] if messages and isinstance(messages[0], dict) else list(messages))  # type: ignore[list-item, arg-type]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = (list(sampling_params) if isinstance(sampling_params, Sequence)
                  else [sampling_params] * len(conversations))
        self.calls.append(ChatCall(conversations, params, use_tqdm, chat_template, add_generation_prompt,
                                   continue_final_message, threading.current_thread().name))
        if len(params) != len(conversations):
            raise VLLMValidationError(f"The lengths of prompts ({len(conversations)}) "
                                      f"and params ({len(params)}) must be the same.")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message cannot be True if add_generation_prompt is also True")
        outputs = []
        for conversation, sp in zip(conversations, params, strict=True):
            if continue_final_message and conversation[-1]["role"] != "assistant":
                raise ValueError("continue_final_message needs the conversation to end with an assistant message")
            text = " ".join(str(m["content"]) for m in conversation)
            if "<too long>" in text:  # vLLM aborts the requests it already added, then raises
                raise VLLMValidationError("The decoder prompt (length 40000) is longer than the maximum model "
                                          "length of 32768. Make sure that `max_model_len` is no smaller than "
                                          "the number of text tokens.")
            if "<engine dead>" in text:
                raise EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the root cause.")
            if "<retry>" in text:
                raise RetryableRequestError("Request failed; please retry")
            prompt = _render(conversation, add_generation_prompt)
            samples = [self._sample(conversation, sp, k, error="<finish error>" in text) for k in range(sp.n)]
            outputs.append(RequestOutput(str(self._counter), prompt, list(range(len(prompt.split()))), None, samples))
            self._counter += 1
        return outputs

    def _sample(self, conversation: Conversation, sp: SamplingParams, k: int, *, error: bool) -> CompletionOutput:
        text = REPLY(conversation, sp, k) if REPLY is not None else None
        if text is None:
            text = _builtin_reply(conversation, sp, k)
        words = text.split(" ")
        reason = "error" if error else "stop"
        if sp.max_tokens is not None and len(words) > sp.max_tokens:
            words, reason = words[:sp.max_tokens], "length"
        return CompletionOutput(k, " ".join(words), list(range(len(words))), finish_reason=reason)


def _render(conversation: Conversation, add_generation_prompt: bool) -> str:
    """A ChatML-like template; a continued final message is left open."""
    parts = [f"<|{m['role']}|> {m['content']}" for m in conversation]
    return " ".join(parts) + (" <|assistant|>" if add_generation_prompt else "")


def _builtin_reply(conversation: Conversation, sp: SamplingParams, k: int) -> str:
    so = sp.structured_outputs
    if so is not None and so.json is not None:
        schema = json.loads(so.json) if isinstance(so.json, str) else so.json
        return json.dumps(_instance(schema, "value", k))
    if so is not None and so.choice:
        key = zlib.crc32(json.dumps(conversation).encode()) + k
        return so.choice[key % len(so.choice)]
    last = " ".join(str(conversation[-1]["content"]).split()[:5])
    return f"stand-in reply {k} to: {last}"


def _instance(schema: dict[str, Any], name: str, k: int) -> Any:
    """A small value of the schema's shape, as constrained decoding would produce."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "string")
    if kind == "object":
        return {p: _instance(s, p, k) for p, s in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_instance(schema.get("items") or {}, name, k)]
    if kind == "integer":
        return k
    if kind == "number":
        return k + 0.5
    if kind == "boolean":
        return True
    return f"{name} {k}"[: schema.get("maxLength", 1000)]
