"""Helpers of ``bench/bench_transport.py``: carve-serve side by side with an openpi-protocol server
and LeRobot's async-inference protocol (servers, clients, the LeRobot stub loader)."""
