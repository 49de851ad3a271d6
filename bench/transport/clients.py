"""Client worker processes: each one plays one robot of any peer, task by task."""

from __future__ import annotations

import time
import traceback


def make_client(task: dict, stub_dir: str | None):
    from bench.transport.common import observation
    state, images = observation(task["n_images"])
    kind = task["kind"]
    if kind == "carve":
        from bench.transport.carve_peer import CarveClient
        return CarveClient(task["port"], state, images)
    if kind == "openpi":
        from bench.transport.openpi_peer import OpenpiClient
        return OpenpiClient(task["port"], state, images)
    if kind == "floor":
        from bench.transport.grpc_floor_peer import FloorClient
        return FloorClient(task["port"], state, images)
    if kind == "lerobot":
        from bench.transport.lerobot_peer import LerobotClient
        return LerobotClient(f"127.0.0.1:{task['port']}", stub_dir, state, images)
    raise ValueError(kind)


def run_task(task: dict, barrier, stub_dir: str | None) -> dict:
    """Connect, warm up, (wait for the other clients), then either ``calls`` timed calls
    (latency) or as many calls as fit in ``seconds`` (throughput)."""
    client = make_client(task, stub_dir)
    try:
        for _ in range(task["warmup"]):
            client.call()
        if task["sync"]:
            barrier.wait(timeout=120)
        lat = []
        t_start = time.perf_counter()
        if task["mode"] == "latency":
            for _ in range(task["calls"]):
                t0 = time.perf_counter()
                client.call()
                lat.append((time.perf_counter() - t0) * 1e3)
        else:
            end = t_start + task["seconds"]
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    break
                client.call()
                lat.append((time.perf_counter() - t0) * 1e3)
        elapsed = time.perf_counter() - t_start
        return {"lat_ms": lat, "count": len(lat), "elapsed_s": elapsed,
                "impl": getattr(client, "impl", client.name)}
    finally:
        client.close()


def worker(index: int, conn, barrier, stub_dir: str | None, max_seconds: float) -> None:
    """Subprocess entry: answer tasks from ``conn`` until it sends None or closes."""
    from bench.transport.common import set_threads, watch_parent
    set_threads(torch_too=stub_dir is not None)  # unpickling LeRobot's actions needs torch
    watch_parent(max_seconds)
    # preload what the clients use so that tasks start fast
    import carve_client  # noqa: F401
    import websockets.sync.client  # noqa: F401
    try:
        import openpi_client.websocket_client_policy  # noqa: F401
    except ImportError:
        pass
    conn.send({"ready": index})
    while conn.poll(max_seconds):
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        try:
            conn.send(run_task(task, barrier, stub_dir))
        except Exception as e:  # report, keep serving; a broken barrier frees the others
            if task.get("sync"):
                barrier.abort()
            conn.send({"error": f"{type(e).__name__}: {e}",
                       "trace": traceback.format_exc(limit=3)})
