"""The mock answers discovery's NVML calls exactly as a real H200 did.

The trace was recorded on a real H200 (tests/fixtures/nvml/README.md); replaying
discovery against the `h200-141gb` profile must give the same calls in the same
order with the same answers and error codes. Only the GPU's UUID may differ: the
trace comes from another physical H200 than the capture the profile reproduces.
"""

from __future__ import annotations

import json
from pathlib import Path

from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from tests.support.nvml_trace import traced

TRACE = Path(__file__).parents[1] / "fixtures/nvml/h200-discovery-trace.json"
MACHINE_SPECIFIC = {"nvmlDeviceGetUUID"}


def test_mock_h200_replays_the_real_discovery_trace() -> None:
    real = json.loads(TRACE.read_text())["calls"]
    provider, recorder = traced(mock_provider("h200-141gb"))
    discover(provider)
    mock = json.loads(json.dumps(recorder.calls))
    assert [call[:2] for call in mock] == [call[:2] for call in real], "same calls, same order"
    for real_call, mock_call in zip(real, mock, strict=True):
        if real_call[0] in MACHINE_SPECIFIC:
            assert set(real_call[2]) == set(mock_call[2])
            continue
        assert mock_call == real_call
