"""`python tests/support/plugin_floor.py <gpu-dra plugin arguments>`: `gpu-dra plugin` with
its per-claim work taken out, the floor of a call in this process for the prepare bench
(tests/e2e/test_bench_plugin_api.py), timed beside the Go plugin's own floor
(`goplugin --answer-only`). A prepare GETs each claim from the API server and checks it,
as always, then answers it with no devices; an unprepare only answers. What is left is
what every call costs before any work: the gRPC server, the claim's GET, the answer."""

from __future__ import annotations

from collections.abc import Sequence

from driver.cli.main import run
from driver.plugin.claims import ClaimError, ClaimRef
from driver.plugin.state import Outcome, PluginState


def _prepare(self: PluginState, refs: Sequence[ClaimRef], deadline: float) -> dict[str, Outcome]:
    outcomes = {}
    for ref in refs:
        try:
            self.claim_source.get(ref)
            outcomes[ref.uid] = Outcome()
        except ClaimError as err:
            outcomes[ref.uid] = Outcome(error=str(err), reason=err.reason)
    return outcomes


def _unprepare(self: PluginState, refs: Sequence[ClaimRef],
               deadline: float) -> dict[str, Outcome]:
    return {ref.uid: Outcome() for ref in refs}


if __name__ == "__main__":
    PluginState.prepare = _prepare  # type: ignore[method-assign]
    PluginState.unprepare = _unprepare  # type: ignore[method-assign]
    run()
