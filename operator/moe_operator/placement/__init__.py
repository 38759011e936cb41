"""Expert placement, pure (numpy, no Kubernetes): the data model and PLAN.json (``schema``), the
planner and its evaluation (``planner``), and the baselines it is measured against: ``eplb`` (our
re-implementation of DeepSeek's EPLB) and ``traces`` (synthetic gate decisions).

The names below are the package's public interface; ``eplb`` and ``traces`` are imported by path.
"""

from moe_operator.placement.planner import (
    DEFAULT_BALANCE_TOLERANCE,
    DEFAULT_GROUP_AFFINITY,
    Evaluation,
    evaluate,
    expert_load,
    keep_rank_numbers,
    local_first_load,
    moved_experts,
    optimal_counts,
    plan,
    plan_metrics,
    rebalanced_counts,
    round_robin_plan,
    select_ranks,
)
from moe_operator.placement.schema import (
    MoEShape,
    PlacementError,
    Plan,
    RankSlot,
    tp_group_problem,
    validate_plan,
)

__all__ = [
    "DEFAULT_BALANCE_TOLERANCE",
    "DEFAULT_GROUP_AFFINITY",
    "Evaluation",
    "MoEShape",
    "Plan",
    "PlacementError",
    "RankSlot",
    "evaluate",
    "expert_load",
    "keep_rank_numbers",
    "local_first_load",
    "moved_experts",
    "optimal_counts",
    "plan",
    "plan_metrics",
    "rebalanced_counts",
    "round_robin_plan",
    "select_ranks",
    "tp_group_problem",
    "validate_plan",
]
