"""When to write a pool after its health changes: at most once per interval (1 s per
pool), the latest state in each write, and a change after a quiet spell at once, so a
flapping GPU costs one write per interval and a single failure costs no wait."""

from __future__ import annotations

from collections.abc import Iterable


def next_write(last_write: float | None, change_at: float, interval: float) -> float:
    """When the write that carries a change at `change_at` happens, given the previous
    write's time (None: none yet): at once, or one interval after the previous write.
    Changes until then ride along in that write."""
    if last_write is None:
        return change_at
    return max(change_at, last_write + interval)


def schedule(changes: Iterable[float], interval: float) -> list[float]:
    """The write times for changes at the given times (ascending): `next_write` for
    each change that no write carries yet (a write carries every change up to its time)."""
    writes: list[float] = []
    due: float | None = None
    for at in changes:
        if writes and at <= writes[-1]:
            continue  # that write already carries it
        if due is not None and at > due:
            writes.append(due)
            due = None
        if due is None:
            due = next_write(writes[-1] if writes else None, at, interval)
            if due == at:
                writes.append(due)
                due = None
    if due is not None:
        writes.append(due)
    return writes
