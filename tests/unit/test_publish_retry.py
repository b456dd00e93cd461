"""The API publisher's one retry loop (publish and cleanup): what it retries, what it
reports while waiting, and how it gives up."""

from __future__ import annotations

import pytest

from driver.resourceslice.errors import PublishError, PublishTimeout
from driver.resourceslice.plan import Backoff
from driver.resourceslice.publish import _retry, _Transient

FAST = Backoff(initial=0.02, cap=0.02, jitter=0.0)


def test_transient_failures_are_retried_until_the_attempt_succeeds() -> None:
    failures = [_Transient("the API server"), _Transient("a conflict to clear")]
    waited: list[str] = []

    def attempt() -> str:
        if failures:
            raise failures.pop(0)
        return "done"

    assert _retry(attempt, FAST, None, waiting=waited.append) == "done"
    assert waited == ["the API server", "a conflict to clear"]


@pytest.mark.parametrize(("task", "message"), [
    ("", "gave up after 0.05s waiting for Node n to exist"),
    ("cleanup", "cleanup gave up after 0.05s waiting for Node n to exist"),
])
def test_past_the_deadline_it_gives_up_saying_what_it_waited_for(task: str,
                                                                 message: str) -> None:
    waited: list[str] = []
    gave_up: list[bool] = []

    def attempt() -> None:
        raise _Transient("Node n to exist")

    with pytest.raises(PublishTimeout) as raised:
        _retry(attempt, FAST, 0.05, waiting=waited.append, task=task,
               giving_up=lambda: gave_up.append(True))
    assert str(raised.value) == message
    assert isinstance(raised.value.__cause__, _Transient)
    assert len(waited) >= 1 and set(waited) == {"Node n to exist"}
    assert gave_up == [True]


def test_what_retrying_cannot_fix_goes_through_at_once() -> None:
    waited: list[str] = []
    calls: list[int] = []

    def attempt() -> None:
        calls.append(1)
        raise PublishError("HTTP 403")

    with pytest.raises(PublishError, match="HTTP 403"):
        _retry(attempt, FAST, 10.0, waiting=waited.append)
    assert calls == [1] and waited == []
