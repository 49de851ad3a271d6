"""A LeRobot processor step the ACT experts' preprocessor carries: the Meta-World state vector as
ACT's environment state.

Why it exists: LeRobot's ACT refuses a policy without an image or an
``observation.environment_state`` input (``ACTConfig.validate_features``), while the Meta-World
client sends only the 39-D state vector (hand, gripper, object poses, previous frame, goal) as
``observation.state``, and the LeRobot backend derives the wire's ``state_dim`` from the policy's
``observation.state`` feature. That vector describes the robot *and* the scene, so the
preprocessor exposes it under both keys: ``observation.state`` (ACT's robot-state token) and
``observation.environment_state`` (ACT's environment token). Both are then normalised by the
pipeline's own ``NormalizerProcessorStep`` with the same statistics.

The step is not registered in ``ProcessorStepRegistry`` on purpose: an unregistered step is saved
in ``policy_preprocessor.json`` by its import path (``policy_server.training.act_processors.
StateAsEnvironmentStateStep``), which LeRobot imports when it loads the pipeline, so any process
with carve-serve installed (the server, plain LeRobot code) loads the directory without first
importing this module. Keep the class name and module path stable: saved experts name them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lerobot.configs.types import FeatureType, PipelineFeatureType, PolicyFeature
from lerobot.processor.pipeline import ObservationProcessorStep

OBS_STATE = "observation.state"
OBS_ENV_STATE = "observation.environment_state"


@dataclass
class StateAsEnvironmentStateStep(ObservationProcessorStep):
    """``observation.environment_state`` := ``observation.state`` (the same tensor, any shape:
    (D,) unbatched or (B, D) / (B, T, D) float32); ``observation.state`` is kept. An observation
    that already has an environment state is left unchanged (a dataset that records one)."""

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        if OBS_STATE in observation and OBS_ENV_STATE not in observation:
            observation = dict(observation)
            observation[OBS_ENV_STATE] = observation[OBS_STATE]
        return observation

    def get_config(self) -> dict[str, Any]:
        return {}

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        obs = dict(features.get(PipelineFeatureType.OBSERVATION, {}))
        if OBS_STATE in obs and OBS_ENV_STATE not in obs:
            obs[OBS_ENV_STATE] = PolicyFeature(type=FeatureType.ENV, shape=obs[OBS_STATE].shape)
        return {**features, PipelineFeatureType.OBSERVATION: obs}


__all__ = ["StateAsEnvironmentStateStep", "OBS_STATE", "OBS_ENV_STATE"]
