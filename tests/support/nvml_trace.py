"""Records every NVML call discovery makes, with its answer, as plain JSON.

A trace of real discovery on a GPU machine is the ground truth for the mock:
replaying discovery on the mock profile must produce the same trace.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import pynvml

from driver.nvml import Provider


def plain(value: Any) -> Any:
    """A ctypes value, struct or array as JSON-able data."""
    if isinstance(value, ctypes.Structure):
        return {name: plain(getattr(value, name)) for name, *_ in value._fields_}
    if isinstance(value, ctypes.Array):
        return [plain(item) for item in value]
    if isinstance(value, ctypes._SimpleCData):
        return plain(value.value)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


class Recorder:
    """Wraps a pynvml-like object; `calls` holds [name, args, outcome] rows."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._labels: dict[int, str] = {}
        self.calls: list[list[Any]] = []

    def _label(self, arg: Any) -> Any:
        key = id(arg) if not isinstance(arg, ctypes._Pointer) else ctypes.addressof(arg.contents)
        if key in self._labels:
            return self._labels[key]
        if type(arg).__name__ == "CArgObject":
            return "out"
        if isinstance(arg, ctypes.Array):
            return "buffer"
        return plain(arg)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._nvml, name)
        if not (name.startswith("nvml") and callable(target)):
            return target
        return self._wrap(name, target)

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            shown = [self._label(arg) for arg in args]
            try:
                result = fn(*args)
            except pynvml.NVMLError as err:
                self.calls.append([name, shown, {"error": err.value}])
                raise
            outputs = [plain(arg) for arg in args if isinstance(arg, ctypes.Array)]
            outputs += [plain(arg._obj) for arg in args if type(arg).__name__ == "CArgObject"]
            if name.startswith("nvmlDeviceGetHandle") or name in _HANDLE_MAKERS:
                label = f"{name.removeprefix('nvml')}{shown}"
                if isinstance(result, ctypes._Pointer):
                    self._labels[ctypes.addressof(result.contents)] = label
                else:
                    self._labels[id(result)] = label
                shown_result: Any = label
            else:
                shown_result = plain(result)
            row = {"result": shown_result}
            if outputs:
                row["outputs"] = outputs
            self.calls.append([name, shown, row])
            return result

        call.__name__ = name
        return call


_HANDLE_MAKERS = {"nvmlDeviceGetMigDeviceHandleByIndex", "nvmlDeviceGetGpuInstanceById",
                  "nvmlGpuInstanceGetComputeInstanceById"}


def traced(provider: Provider) -> tuple[Provider, Recorder]:
    recorder = Recorder(provider.nvml)
    return Provider(name=provider.name, nvml=recorder, host=provider.host), recorder
