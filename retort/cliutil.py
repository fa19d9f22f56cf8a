"""What the commands share below cli.py, so that a command living elsewhere (`retort compare`, in
retort/comparison/command.py) uses it without importing the command line back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from retort.errors import UserError

__all__ = ["collector_for_runs", "name_values"]


def name_values(items: list[str] | None, flag: str) -> dict[str, str]:
    """`--model`, `--map`: NAME=VALUE items as a dict; anything else is one usage error."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: expected NAME=VALUE")
        out[key] = value
    return out


@contextlib.contextmanager
def collector_for_runs() -> Iterator[None]:
    """The garbage collector tuned for a run, in the command line's own process only (the library
    changes nothing process-wide). A run allocates millions of short-lived objects and keeps few:
    the default collector (the youngest generation every 700 allocations, and full collections over
    every object the imports made) costs 10-20 us per call and stalls the event loop 30-80 ms at a
    time (bench/bench_store.py). Freezing what is loaded and collecting the youngest generation
    every 50,000 allocations removes both; both are restored on the way out."""
    import gc

    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
