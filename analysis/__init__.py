"""Polars queries over the Parquet interaction logs: metrics, paper figures and the HTML report (see README.md)."""

from analysis.dataset import BadPart, Dataset, open_dataset, scan_eval
from analysis.metrics import (
    across_runs,
    agent_games,
    cooperation_by_agent,
    cooperation_by_type,
    cooperator_choice,
    generalisation_matrix,
    llm_episodes,
    llm_training,
    outcome_mix,
    reward_vs_payoff,
    selection_matrix,
    social_outcomes,
)

__all__ = [
    "BadPart",
    "Dataset",
    "across_runs",
    "agent_games",
    "cooperation_by_agent",
    "cooperation_by_type",
    "cooperator_choice",
    "generalisation_matrix",
    "llm_episodes",
    "llm_training",
    "open_dataset",
    "outcome_mix",
    "reward_vs_payoff",
    "scan_eval",
    "selection_matrix",
    "social_outcomes",
]
