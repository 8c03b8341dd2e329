"""Environment authoring kit: what a tenant writes to train an agent on their task.

No Django, no torch: environments run the same in training, evaluation and inference.
"""

from opentinker.env.base import Environment, Observation, StepResult

__all__ = ["Environment", "Observation", "StepResult"]
