"""Policy runtime: ``base + core`` folded once, skill residuals resident, applied fused (merged into
the weights) or per batch row on a low-rank side path; a micro-batcher in front.
See docs/RUNTIME.md."""

from policy_server.runtime.batcher import BatcherClosed, BatcherFull, MicroBatcher
from policy_server.runtime.residual_layers import (ResidualEmbedding, ResidualLayerNorm,
                                                   ResidualLinear, SidePathError)
from policy_server.runtime.runtime import MODES, PolicyRuntime
from policy_server.runtime.skill_bank import ResidualStack, SkillBank

__all__ = ["BatcherClosed", "BatcherFull", "MicroBatcher", "MODES", "PolicyRuntime",
           "ResidualEmbedding", "ResidualLayerNorm", "ResidualLinear", "ResidualStack",
           "SidePathError", "SkillBank"]
