"""mlx_serving.canary: canary rollouts (bucketing, statistics, guards, state machine, flags).

Pure Python + numpy + scipy + pydantic; no Ray, no MLX. See docs/CANARY_STATS.md.
"""

from mlx_serving.canary.bucketing import bucket, routes_to_canary
from mlx_serving.canary.config import AnalysisConfig
from mlx_serving.canary.flags import Flag, FlagSet
from mlx_serving.canary.guards import GuardConfig, check_guards
from mlx_serving.canary.plan import RolloutPlan, Stage
from mlx_serving.canary.samples import Arm, Sample, SampleSet, StageSamples
from mlx_serving.canary.state import (Action, Decision, Phase, Rollout, RolloutState,
                                      TransitionError)
from mlx_serving.canary.stats import Analysis, Outcome, Verdict, analyze
from mlx_serving.canary.store import AuditLog, StateStore

__all__ = [
    "bucket", "routes_to_canary", "Arm", "Sample", "SampleSet", "analyze", "Analysis",
    "Outcome", "GuardConfig", "check_guards", "Stage", "RolloutPlan", "AnalysisConfig",
    "Phase", "RolloutState", "Rollout", "Decision", "StateStore", "AuditLog", "Flag",
    "FlagSet",
    # also useful to the controller
    "Action", "TransitionError", "Verdict", "StageSamples",
]
