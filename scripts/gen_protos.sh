#!/usr/bin/env bash
# Regenerates the checked-in gRPC code from protos/ into the client package, where both the server
# and the clients import it from (never edit clients/carve_client/carve_client/proto by hand).
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: clients/carve_client/carve_client/proto)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-clients/carve_client/carve_client/proto}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
"$PY" -m grpc_tools.protoc -Iprotos --python_out="$OUT" --grpc_python_out="$OUT" --pyi_out="$OUT" \
  protos/carve/policy/v1/policy.proto
# protoc emits absolute imports (`from carve.policy.v1 import policy_pb2`); make them package-relative.
sed -i 's/^from carve\.policy\.v1 import policy_pb2/from . import policy_pb2/' \
  "$OUT/carve/policy/v1/policy_pb2_grpc.py"
touch "$OUT/__init__.py" "$OUT/carve/__init__.py" "$OUT/carve/policy/__init__.py" "$OUT/carve/policy/v1/__init__.py"
