"""The interaction-record schema: one Arrow schema, declared once. One row per game.

Layout on disk (Hive-partitioned; `run` comes from the directory name, not from the file):
    <output>/<destination_folder>/manifest.json
    <output>/<destination_folder>/run=<k>/part-<first iteration:08d>.parquet
Read everything with
    polars.scan_parquet("<output>/<folder>/**/*.parquet", hive_partitioning=True)

"M" = the selector (the agent that chose its partner), "O" = the selected partner.
"""

from __future__ import annotations

import pyarrow as pa

from simulator.contracts import REASON_NAMES

CODE = pa.dictionary(pa.int16(), pa.string())  # agent type codes ("UT", "TFT", ...)
REASON = pa.dictionary(pa.int8(), pa.string())  # simulator.contracts.Reason names

# (name, type, nullable, meaning)
_CORE: list[tuple[str, pa.DataType, bool, str]] = [
    ("iteration", pa.int32(), False, "iteration (the anchor's episode), 0-based"),
    ("order", pa.int32(), False, "position of this game in the iteration's shuffled order"),
    ("selector", pa.int32(), False, "population slot of M"),
    ("selected", pa.int32(), False, "population slot of O, the partner M chose"),
    ("selector_type", CODE, False, "type code of M"),
    ("selected_type", CODE, False, "type code of O"),
    ("selector_state", pa.int8(), False, "M's dilemma state: O's snapshot move (0=C, 1=D), i.e. the chosen partner's last move"),
    ("selected_state", pa.int8(), False, "O's dilemma state: M's move in the snapshot"),
    ("selector_action", pa.int8(), False, "M's move (0=C, 1=D)"),
    ("selected_action", pa.int8(), False, "O's move"),
    ("selector_payoff", pa.float32(), False, "M's game payoff R_M"),
    ("selected_payoff", pa.float32(), False, "O's game payoff R_O"),
    ("selector_moral_reward", pa.float32(), True, "M's moral reward (null for static strategies)"),
    ("selected_moral_reward", pa.float32(), True, "O's moral reward (null for static strategies)"),
    ("selector_learning_reward", pa.float32(), True, "reward M learned from (moral reward, R_illegal for LLMs; null if static)"),
    ("selected_learning_reward", pa.float32(), True, "reward O learned from"),
    ("selector_reason", REASON, False, f"why M made its move: {', '.join(REASON_NAMES)}"),
    ("selected_reason", REASON, False, "why O made its move"),
    ("selection_reason", REASON, False, "why M chose O"),
    ("selector_available_c", pa.int16(), False, "how many cooperators (last move C) M could pick from"),
    ("collective_payoff", pa.float32(), False, "R_M + R_O"),
    ("equality", pa.float32(), False, "1 - |R_M - R_O| / (|R_M| + |R_O|), 1 when both are 0"),
    ("min_payoff", pa.float32(), False, "min(R_M, R_O)"),
]

# LLM columns, present in runs that have LLM agents; null for the other players of those runs.
_LLM: list[tuple[str, pa.DataType, bool, str]] = [
    (f"{role}_{name}", t, True, f"{'M' if role == 'selector' else 'O'}: {meaning}")
    for role in ("selector", "selected")
    for name, t, meaning in [
        ("prompt_variant", pa.string(), "prompt variant id"),
        ("action_tokens", pa.string(), "legal action tokens 'C-token|D-token'"),
        ("answer_mode", pa.string(), "free (sampled freely, the paper) or mask (restricted to the legal answers)"),
        ("raw_answer", pa.string(), "the model's raw answer"),
        ("legal", pa.bool_(), "whether the answer was a legal action token"),
        ("p_cooperate", pa.float32(), "P(C-token) / (P(C-token) + P(D-token)) for this prompt"),
        ("adapter_version", pa.int32(), "version of the LoRA adapter that acted (= PPO updates so far)"),
        ("kl", pa.float32(), "KL to the base model in the agent's latest PPO update before this game"),
        ("policy_loss", pa.float32(), "PPO policy loss of that update"),
        ("value_loss", pa.float32(), "PPO value loss of that update"),
        # the learned virtue ensemble (moral types VR, Game+VR; actors/llm/virtue/dilemma.py); null for other players
        ("stated_reason", pa.string(), "the one-sentence reason the agent gave for its move when asked after it (VR types)"),
        ("stated_reason_cut", pa.bool_(), "whether that reason stopped at its token limit ([llm.virtue] reason_tokens), "
                                          "not at an end-of-turn token"),
        ("virtue_action", pa.float32(), "score of the action reward model on (game prompt, move, motivation question, "
                                        "reason)"),
        ("virtue_motivation", pa.float32(), "score of the motivation reward model on the same conversation"),
        ("virtue_consequences", pa.float32(), "score of the consequences reward model on the same conversation"),
        ("virtue_score", pa.float32(), "the ensemble: mean - lam * std (population std) of the three scores; the moral "
                                       "reward adds weight * virtue_score to the type's payoff part"),
    ]
]


def _schema(cols: list[tuple[str, pa.DataType, bool, str]]) -> pa.Schema:
    return pa.schema([pa.field(n, t, nullable=nl, metadata={"doc": d}) for n, t, nl, d in cols])


RECORD_SCHEMA: pa.Schema = _schema(_CORE)
LLM_RECORD_SCHEMA: pa.Schema = _schema(_CORE + _LLM)
PARTITION_COLUMN = "run"
SCHEMA_VERSION = 2  # 1: the core and the LLM columns; 2: the virtue columns (stated_reason ... virtue_score), additive


def describe() -> str:
    """Markdown table of the schema, for the README and `--help-schema`."""
    rows = ["| column | type | meaning |", "|---|---|---|"]
    for f in LLM_RECORD_SCHEMA:
        rows.append(f"| {f.name} | {f.type} | {f.metadata[b'doc'].decode()} |")
    return "\n".join(rows)
