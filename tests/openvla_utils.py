"""Fixtures of the OpenVLA tests: the tiny published-layout checkpoint builders live in the package
(``policy_server.models.openvla.tiny``) so the benchmark can use them too."""

from policy_server.models.openvla.tiny import *  # noqa: F401,F403
from policy_server.models.openvla.tiny import (ACTION_DIM, CHUNK, OFT, PROPRIO_DIM, V_TOK,  # noqa: F401
                                               norm_stats)
