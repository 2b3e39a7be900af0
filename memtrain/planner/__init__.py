"""Place every byte of a training step across GPU, CPU, CXL and NVMe: ``make_plan``.

profile (per-layer bytes and times) + hardware (tiers, bandwidths) -> a versioned plan that says,
per layer, what to keep, swap or recompute and where parameters, gradients and optimizer
states live, with the predicted peaks and step time.
"""

from memtrain.planner.costmodel import STATE_MODES
from memtrain.planner.evaluate import Evaluation, LayerDecision, evaluate
from memtrain.planner.plan import (
    BASELINES,
    Plan,
    PlanInfeasible,
    PlanOptions,
    baseline_decisions,
    make_plan,
    minimum_gpu_budget,
)
from memtrain.planner.problem import PlanProblem, apply_fused_loss, build_problem
from memtrain.planner.solve import SolveResult, solve, solver_name

__all__ = [
    "BASELINES",
    "STATE_MODES",
    "Evaluation",
    "LayerDecision",
    "Plan",
    "PlanInfeasible",
    "PlanOptions",
    "PlanProblem",
    "SolveResult",
    "apply_fused_loss",
    "baseline_decisions",
    "build_problem",
    "evaluate",
    "make_plan",
    "minimum_gpu_budget",
    "solve",
    "solver_name",
]
