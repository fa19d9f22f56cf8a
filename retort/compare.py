"""Placeholder replaced by the compare implementation."""

from typing import Any


def add_parser(sub: Any) -> None:
    return None
