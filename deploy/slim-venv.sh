#!/bin/sh
# Remove from the image's virtualenv what `gpu-dra` never loads, then compile what is
# left (the image sets PYTHONDONTWRITEBYTECODE, so bytecode must ship for a fast start):
# - the Kubernetes client's generated API classes and models (about 57 MB): the driver
#   calls the API server raw through the client's ApiClient (driver/kube/api.py), and the
#   client's package __init__ files load them only when one is asked for by name;
# - its asyncio copy, kubernetes/aio (68 MB), and aiohttp with its own dependencies,
#   which only that copy imports;
# - pip and setuptools: nothing is installed at run time.
# Run by deploy/Dockerfile's build stage:   slim-venv.sh VENV
set -eu
venv=$1
site=$(echo "$venv"/lib/python3*/site-packages)
"$venv/bin/python" -m pip uninstall --quiet --yes \
  aiohttp aiohttp-retry aiohappyeyeballs aiosignal frozenlist multidict propcache yarl \
  setuptools pip
rm -rf "$site/kubernetes/aio"
find "$site/kubernetes/client/api" "$site/kubernetes/client/models" -name '*.py' \
  ! -name __init__.py -delete
find "$venv" -name __pycache__ -prune -exec rm -rf {} +
"$venv/bin/python" -m compileall -q -j 0 "$site"
