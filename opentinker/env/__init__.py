"""Environment authoring kit: what a tenant writes to train an agent on their task.

No Django, no torch: environments run the same in training, evaluation and inference.
"""

from opentinker.env.base import Environment, Observation, StepResult
from opentinker.env.dataset import DatasetEnvironment
from opentinker.env.multiagent import MultiAgentEnvironment, MultiStepResult, RewardMode, TurnOrder
from opentinker.env.rubric import Criterion, Rubric
from opentinker.env.tools import Tool, ToolEnvironment, tool

__all__ = [
    "Criterion",
    "DatasetEnvironment",
    "Environment",
    "MultiAgentEnvironment",
    "MultiStepResult",
    "Observation",
    "RewardMode",
    "Rubric",
    "StepResult",
    "Tool",
    "ToolEnvironment",
    "TurnOrder",
    "tool",
]
