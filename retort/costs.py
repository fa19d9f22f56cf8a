"""What calls cost: a model's price per million tokens, from its spec or a small built-in table.

A model entry may set `price_input` and `price_output` (USD per million prompt / completion
tokens); they win. Otherwise a well-known hosted model served from its vendor's own endpoint
has a price here (list prices, USD per million tokens, as published by the vendor; check them
before relying on a figure). The embedded model costs nothing. Any
other model (your vLLM server, a LangChain model) has no price unless its entry sets one: its
cost is shown as unknown, never as zero.
"""

from __future__ import annotations

from typing import Any

OPENAI = "https://api.openai.com/v1"

# (input, output) USD per million tokens, for models reached at OPENAI.
KNOWN_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "gpt-3.5-turbo": (0.50, 1.50),
}


def price(config: dict[str, Any]) -> tuple[float, float] | None:
    """(input, output) USD per million tokens for a resolved model entry, or None when unknown."""
    pin, pout = config.get("price_input"), config.get("price_output")
    if pin is not None or pout is not None:
        return float(pin or 0.0), float(pout or 0.0)
    if config.get("backend") == "local":  # the embedded model runs here: no bill
        return 0.0, 0.0
    if config.get("backend") != "openai":
        return None
    urls = config.get("base_url") or OPENAI
    if (urls if isinstance(urls, str) else "|".join(urls)).rstrip("/") != OPENAI:
        return None
    return KNOWN_PRICES.get(str(config.get("model", "")))


def usd(prompt_tokens: float, completion_tokens: float, rates: tuple[float, float] | None) -> float | None:
    if rates is None:
        return None
    return (prompt_tokens * rates[0] + completion_tokens * rates[1]) / 1e6
