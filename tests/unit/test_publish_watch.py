"""Stopping the resync loop's watch from another thread (a stop, or publish() giving up):
a watch that ended on its own meanwhile is nothing to interrupt, not an error."""

from __future__ import annotations

import io

import urllib3

from driver.resourceslice.publish import ApiPublisher, SlicePool


def test_interrupting_a_watch_that_already_ended_is_quiet() -> None:
    publisher = ApiPublisher(object(), SlicePool("gpu.dra.dev", "node-a"))
    ended = urllib3.HTTPResponse(body=io.BytesIO(b""), preload_content=False)
    ended.read()
    ended.release_conn()  # what urllib3 leaves of a watch response that finished
    publisher._watch_resp = ended
    publisher._interrupt_watch()
    assert publisher._watch_resp is None
