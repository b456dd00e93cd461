"""The errors publishing raises; both are :class:`driver.errors.SliceError`s."""

from __future__ import annotations

from driver.errors import SliceError


class PublishError(SliceError, RuntimeError):
    """Publishing cannot succeed by retrying: the slices, the RBAC or the cluster need a fix."""


class PublishTimeout(SliceError, RuntimeError):
    """:meth:`ApiPublisher.publish` gave up waiting; the resync loop keeps trying."""
