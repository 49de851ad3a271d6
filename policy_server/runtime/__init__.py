"""Policy runtime: ``base + core`` folded once, skill residuals resident, applied fused (merged into
the weights) or per batch row on a low-rank side path; a micro-batcher in front.
See docs/RUNTIME.md."""

from policy_server.errors import BatcherClosed, BatcherFull, NonFiniteActions
from policy_server.action_guard import ActionGuard
from policy_server.runtime.batcher import MicroBatcher
from policy_server.runtime.capture import InputCapture
from policy_server.runtime.residual_layers import (ResidualEmbedding, ResidualLayerNorm,
                                                   ResidualLinear, SidePathError)
from policy_server.runtime.runtime import MODES, PolicyRuntime
from policy_server.runtime.skill_bank import ResidualStack, SkillBank

__all__ = ["ActionGuard", "BatcherClosed", "BatcherFull", "InputCapture", "MicroBatcher", "MODES",
           "NonFiniteActions", "PolicyRuntime", "ResidualEmbedding", "ResidualLayerNorm",
           "ResidualLinear", "ResidualStack", "SidePathError", "SkillBank"]
