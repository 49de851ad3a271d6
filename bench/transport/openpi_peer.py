"""The openpi websocket policy protocol, server side written here from the published protocol.

Protocol (what PyPI's ``openpi-client`` ``WebsocketClientPolicy`` speaks): a websocket with
compression off and no size limit; on connect the server sends its metadata as one binary msgpack
frame; then per step the client sends a msgpack observation dict and the server answers a msgpack
dict with ``actions`` (+ ``server_timing``); a text frame is an error. numpy arrays travel as the
map ``{b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str, b"shape": shape}`` (scalars
as ``{b"__npgeneric__": True, b"data": item, b"dtype": str}``). As in openpi's server, the policy
runs inline on the asyncio event loop, so one slow forward pass serialises every client.
"""

from __future__ import annotations

import time

import numpy as np


def _encode(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "VOc":
            raise ValueError(f"unsupported dtype {obj.dtype}")
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str,
                b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _decode(obj):
    if b"__ndarray__" in obj:  # zero-copy view of the frame's bytes
        return np.frombuffer(obj[b"data"], dtype=np.dtype(obj[b"dtype"])).reshape(obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def packb(obj) -> bytes:
    import msgpack
    return msgpack.packb(obj, default=_encode)


def unpackb(data: bytes):
    import msgpack
    return msgpack.unpackb(data, object_hook=_decode)


def serve(policy_ms: float, conn, max_seconds: float) -> None:
    """Subprocess entry: serve on 127.0.0.1:0, send the port on ``conn``, run until ``conn``
    receives anything (or closes), at most ``max_seconds``."""
    from bench.transport.common import noop_policy, set_threads, watch_parent
    set_threads()
    watch_parent(max_seconds)
    import asyncio

    import websockets
    from websockets.asyncio.server import serve as ws_serve

    metadata = {"policy": "noop", "action_chunk": [50, 7]}

    async def handler(ws):
        await ws.send(packb(metadata))
        while True:
            try:
                obs = unpackb(await ws.recv())
                t0 = time.monotonic()
                actions = {"actions": noop_policy(policy_ms)}   # inline, like openpi
                _ = obs  # the no-op policy ignores the observation (it was decoded, as openpi does)
                actions["server_timing"] = {"infer_ms": (time.monotonic() - t0) * 1e3}
                await ws.send(packb(actions))
            except websockets.ConnectionClosed:
                break

    async def main():
        async with ws_serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
            port = server.sockets[0].getsockname()[1]
            conn.send({"port": port})
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, conn.poll, max_seconds)  # until told to stop
            server.close()

    try:
        asyncio.run(main())
    except (EOFError, OSError):
        pass


class OpenpiClient:
    """PyPI ``openpi-client``'s ``WebsocketClientPolicy`` when importable, else a minimal client
    speaking the same protocol (``websockets.sync``); ``impl`` says which."""

    name = "openpi"

    def __init__(self, port: int, state, images, timeout: float = 10.0):
        self._obs = {"observation/state": state, "prompt": "noop",
                     **{f"observation/{k}": v for k, v in images.items()}}
        try:
            from openpi_client.websocket_client_policy import WebsocketClientPolicy
        except ImportError:
            WebsocketClientPolicy = None
        if WebsocketClientPolicy is not None:
            self.impl = "openpi-client"
            self._policy = WebsocketClientPolicy(host="127.0.0.1", port=port)
            self._infer = self._policy.infer
            ws = getattr(self._policy, "_ws", None)  # the client has no public close
            self._close = ws.close if ws is not None else (lambda: None)
        else:
            from websockets.sync.client import connect
            self.impl = "own minimal client"
            self._ws = connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None,
                               open_timeout=timeout)
            self._timeout = timeout
            unpackb(self._ws.recv(timeout=timeout))  # metadata
            self._infer = self._own_infer
            self._close = self._ws.close

    def _own_infer(self, obs):
        self._ws.send(packb(obs))
        resp = self._ws.recv(timeout=self._timeout)
        if isinstance(resp, str):
            raise RuntimeError(f"error from the openpi server:\n{resp}")
        return unpackb(resp)

    def call(self):
        return self._infer(self._obs)["actions"]

    def close(self):
        self._close()
