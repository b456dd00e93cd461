#!/usr/bin/env bash
# One run on a GPU machine (the `device` tool): build the native module with the
# machine's python3, run the read-only device tests, and capture real discovery
# (output and NVML call trace) for the mock's fidelity tests. Never changes any
# GPU setting.
#
# Carry (the `device` tool's carry): build/device-wheels (scripts/device-wheels.sh: the
# Python dependencies, the machine has no package index) and build/device-tools.tar.gz
# (scripts/device-tools.sh: static runc, cdi-resolve and busybox; the machine has no Go
# and maybe no runc), unpacked here into build/device-tools, where
# tests/device/test_container_gpu.py finds them. The container test runs as root and
# builds its CUDA probe with the machine's cc (the one that builds the native module).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1  # no `set -e` here: stop rather than run elsewhere
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ -d build/device-wheels ]; then  # scripts/device-wheels.sh: the plugin's dependencies
    if python3 -m venv --system-site-packages /tmp/gpu-dra-venv >"$OUT/install.log" 2>&1; then
        export PATH=/tmp/gpu-dra-venv/bin:$PATH
        target=()
    else  # no venv module: install beside the system packages
        target=(--target /tmp/gpu-dra-site)
        export PYTHONPATH=$PYTHONPATH:/tmp/gpu-dra-site
    fi
    python3 -m pip install -q --no-index --find-links build/device-wheels "${target[@]}" \
        build/device-wheels/*.whl >>"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
fi
if [ -f build/device-tools.tar.gz ]; then
    tar -xzf build/device-tools.tar.gz -C build || exit 1
    build/device-tools/runc --version | head -1
fi
python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; exit 1; }
nvidia-smi -q -x >"$OUT/smi.xml"
{ nvidia-smi; nvidia-smi topo -m; nvidia-smi mig -lgip; nvidia-smi mig -lgipp; nvidia-smi -L; } \
    >"$OUT/smi.txt" 2>&1
python3 -m pytest tests/device -v -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/device-tests.log"
python3 -m driver.cli discover | tee "$OUT/discover.txt"
python3 -m driver.cli discover -o json >"$OUT/discover.json"
python3 - "$OUT" <<'PY'
import json, sys, time
from driver.inventory.discovery import discover
from driver.nvml.real import real_provider
from tests.support.nvml_trace import traced

out = sys.argv[1]
provider, recorder = traced(real_provider())
discover(provider)
json.dump({"calls": recorder.calls}, open(f"{out}/discovery-trace.json", "w"), indent=1)
provider = real_provider()
times = []
for _ in range(20):
    t = time.perf_counter(); discover(provider); times.append(time.perf_counter() - t)
times.sort()
print(f"real discovery pass: median {times[10]*1e3:.2f} ms, min {times[0]*1e3:.2f} ms (20 runs)")
PY
