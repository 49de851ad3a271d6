"""The checked-in generated gRPC code must match protos/ (regenerate with scripts/gen_protos.sh)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEN = ROOT / "clients/carve_client/carve_client/proto/carve/policy/v1"


def test_generated_code_matches_proto(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", str(ROOT / "scripts/gen_protos.sh"), str(tmp_path)], check=True,
                   env=env, cwd=ROOT, capture_output=True)
    for name in ("policy_pb2.py", "policy_pb2_grpc.py", "policy_pb2.pyi"):
        fresh = (tmp_path / "carve/policy/v1" / name).read_text()
        assert fresh == (GEN / name).read_text(), f"{name} is stale: run scripts/gen_protos.sh"
