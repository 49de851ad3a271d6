"""carve-client: the robot-side client of carve-serve (numpy, grpcio, protobuf; no torch).

Public names are re-exported here; the wire codec is ``carve_client.codec`` and the generated
stubs live under ``carve_client.proto.carve.policy.v1``.
"""

from carve_client.aio import AsyncEpisode, AsyncPolicyClient
from carve_client.auth import TOKEN_ENV, TokenError, read_token, read_token_file
from carve_client.blending import AGGREGATES, ChunkBlender
from carve_client.client import Episode, PolicyClient
from carve_client.errors import PolicyError
from carve_client.routing import RouteDecision
from carve_client.spec import ImageSpec, PolicySpec

__version__ = "0.1.0"

__all__ = ["AGGREGATES", "AsyncEpisode", "AsyncPolicyClient", "ChunkBlender", "Episode",
           "ImageSpec", "PolicyClient", "PolicyError", "PolicySpec", "RouteDecision", "TOKEN_ENV",
           "TokenError", "read_token", "read_token_file"]
