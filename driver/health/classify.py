"""Which XIDs take a GPU out of service: NVIDIA's XID catalog as a table, the driver's
recovery action, and the admin's settings.

The order, first match wins: an XID the admin ignores is informational; else the
recovery action the driver reports with the event (none: informational; reset, reboot or
drain: fatal); else the table; an XID the table does not know is fatal, as in NVIDIA's
own driver, because an unknown error is no proof of a usable GPU. Informational XIDs are
the application's own faults (a bad kernel, a page fault): the GPU is fine for the next
pod. Fatal ones give the settings' fatal effect: NoSchedule, or NoExecute when eviction
is opted into.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from driver.errors import HealthError
from driver.health.model import Effect, RecoveryAction


@dataclass(frozen=True)
class Xid:
    """One row of the table: what the XID means, and whether the GPU is unusable after."""

    meaning: str
    fatal: bool


XIDS: dict[int, Xid] = {
    13: Xid("graphics engine exception (an application fault)", False),
    31: Xid("GPU memory page fault (an application fault)", False),
    43: Xid("GPU stopped processing a channel (an application fault)", False),
    45: Xid("preemptive cleanup after earlier errors", False),
    48: Xid("double-bit ECC error", True),
    62: Xid("internal micro-controller halt", True),
    63: Xid("ECC page retirement or row remapping recorded (reset to apply)", True),
    64: Xid("ECC page retirement or row remapping failed", True),
    68: Xid("video decoder (NVDEC) exception", False),
    74: Xid("NVLink error", True),
    79: Xid("GPU has fallen off the bus", True),
    92: Xid("high single-bit ECC error rate", True),
    94: Xid("contained ECC error", True),
    95: Xid("uncontained ECC error", True),
    109: Xid("context switch timeout (an application fault)", False),
    119: Xid("GSP RPC timeout", True),
    120: Xid("GSP error", True),
}

UNKNOWN = "not in the driver's XID table"
MAX_XID = 2**31 - 1  # NVML reports XIDs as an unsigned long long; labels need less


class HealthSettingsError(HealthError, ValueError):
    """A health setting that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class HealthSettings:
    """The admin's choices (the future `--health-*` flags, their env and chart values).

    `ignored_xids` are informational whatever the driver says; `evict` makes fatal
    conditions NoExecute, so running pods are evicted; conditions NVML reports as
    recovered are given back after `quiet_window_s` seconds without a new event.
    """

    ignored_xids: frozenset[int] = frozenset()
    evict: bool = False
    quiet_window_s: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.ignored_xids, frozenset):
            raise HealthSettingsError("ignored_xids: expected a set of XIDs, got "
                                      f"{type(self.ignored_xids).__name__}")
        for xid in sorted(self.ignored_xids, key=repr):
            if isinstance(xid, bool) or not isinstance(xid, int) or not 1 <= xid <= MAX_XID:
                raise HealthSettingsError(f"ignored_xids: {xid!r} is not an XID "
                                          f"(a whole number from 1 to {MAX_XID})")
        if not isinstance(self.evict, bool):
            raise HealthSettingsError(f"evict: expected true or false, got {self.evict!r}")
        window = self.quiet_window_s
        if isinstance(window, bool) or not isinstance(window, int | float) \
                or not math.isfinite(window) or window <= 0:
            raise HealthSettingsError(f"quiet_window_s: {window!r} is not a number of "
                                      "seconds above 0")

    @property
    def fatal_effect(self) -> Effect:
        return "NoExecute" if self.evict else "NoSchedule"


@dataclass(frozen=True)
class Classification:
    """What an XID does to its GPU, and why (for the log line)."""

    effect: Effect
    meaning: str
    why: str

    @property
    def fatal(self) -> bool:
        return self.effect != "None"


def meaning(xid: int) -> str:
    return XIDS[xid].meaning if xid in XIDS else UNKNOWN


def classify(xid: int, recovery: RecoveryAction | None,
             settings: HealthSettings) -> Classification:
    """The effect of one XID on its GPU; see the module's docstring for the order."""
    if xid in settings.ignored_xids:
        return Classification("None", meaning(xid), "ignored by the settings")
    if recovery is not None:
        if recovery == "none":
            return Classification("None", meaning(xid), "the driver asks for no recovery")
        return Classification(settings.fatal_effect, meaning(xid),
                              f"the driver asks for recovery: {recovery}")
    known = XIDS.get(xid)
    if known is None:
        return Classification(settings.fatal_effect, UNKNOWN, "unknown XIDs are fatal")
    if known.fatal:
        return Classification(settings.fatal_effect, known.meaning, "fatal in the XID table")
    return Classification("None", known.meaning, "informational in the XID table")
