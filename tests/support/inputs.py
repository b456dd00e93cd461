"""Hostile inputs shared by the unit and integration tests."""

from __future__ import annotations


def alias_bomb(levels: int, width: int = 10) -> str:
    """A few hundred bytes of YAML that expand to width**levels strings."""
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"
