"""Tables of the virtue pipeline: prompts in, dialogues, judgements and TRL preference datasets out (polars, no torch).

    prompts (JSONL or Parquet, a `prompt` field; optional `id`, `split`)
      └► dialogues   one row per (prompt, sample): the three answers, their token counts and `*_truncated` flags
          └► judgements   one row per (prompt, turn): per virtue the label probabilities in both orders
              │           (`<virtue>_p1_ab`, `_p2_ab`, `_p1_ba`, `_p2_ba`), the winner, the points, the outcome
              └► preferences/<turn>.parquet   TRL's conversational preference format with an explicit prompt:
                     prompt   [{role: user, content: ...}]           (the system message first, when one was used)
                     chosen   [{role: assistant, ...}, {role: user, follow-up}, {role: assistant, ...}]  up to the turn
                     rejected the other dialogue, the same way
                 plus prompt_id, split, the points and the judge's raw verdict columns. Tied pairs are left out.

A prompt without a `split` is held out when crc32(prompt) % 4 == 0 (about 25%), so a file's split never changes.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from actors.llm.virtue.dialogue import FOLLOW_UPS, Message, dialogue_messages
from actors.llm.virtue.scoring import TURNS, VIRTUES, label_share, majority, prob_a_better, virtue_winners
from simulator.errors import ConfigError, CorruptDataError

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    split: str  # "train" or "heldout"
    category: str = ""  # the file's optional `category` (the shipped set: everyday, dilemma_game)


def _default_split(prompt: str) -> str:
    return "heldout" if zlib.crc32(prompt.encode()) % 4 == 0 else "train"


def load_prompts(path: str | os.PathLike[str]) -> list[PromptRecord]:
    """Prompts from a JSONL or Parquet file with a `prompt` column (optional `id`, `split`: train | heldout)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist; expected a .jsonl or .parquet file with a `prompt` column")
    try:
        if path.suffix == ".parquet":
            rows = pl.read_parquet(path).to_dicts()
        elif path.suffix in (".jsonl", ".json"):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            raise ConfigError(f"prompt file {path}: expected .jsonl or .parquet, got {path.suffix!r}")
    except (json.JSONDecodeError, pl.exceptions.PolarsError, OSError) as e:
        raise CorruptDataError(f"cannot read prompts from {path}: {e}") from e
    out, seen = [], set()
    for k, row in enumerate(rows):
        text = row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{path} row {k}: expected a non-empty string `prompt`, got {text!r}")
        split = row.get("split") or _default_split(text)
        if split not in SPLITS:
            raise ConfigError(f"{path} row {k}: split {split!r} is not one of {', '.join(SPLITS)}")
        pid = str(row.get("id") or f"{zlib.crc32(text.encode()):08x}")
        if pid in seen:
            raise ConfigError(f"{path} row {k}: duplicate id {pid!r}")
        seen.add(pid)
        out.append(PromptRecord(pid, text.strip(), split, str(row.get("category") or "")))
    if not out:
        raise ConfigError(f"{path} holds no prompts")
    return out


def select_prompts(prompts: Sequence[PromptRecord], max_train: int | None, max_heldout: int | None) -> list[PromptRecord]:
    """`max_train` train and `max_heldout` held-out prompts (None = all), drawn from every category in turn.

    Per split, the categories take turns (in the order they first appear), each giving its next prompt in file
    order, until the limit: a limit of 24 over everyday and dilemma_game prompts takes 12 of each, where the first
    24 of the file were all everyday. A file without categories gives its first prompts, as before. The result keeps
    the file order."""
    limits = {"train": max_train, "heldout": max_heldout}
    chosen: set[int] = set()
    for split in SPLITS:
        queues: dict[str, list[int]] = {}
        for k, p in enumerate(prompts):
            if p.split == split:
                queues.setdefault(p.category, []).append(k)
        lim = limits[split]
        total = sum(len(q) for q in queues.values())
        want = total if lim is None else min(lim, total)
        heads = dict.fromkeys(queues, 0)
        while want > 0:
            for cat, q in queues.items():
                if want > 0 and heads[cat] < len(q):
                    chosen.add(q[heads[cat]])
                    heads[cat] += 1
                    want -= 1
    return [p for k, p in enumerate(prompts) if k in chosen]


def stable_seed(seed: int, prompt_id: str, sample: int) -> int:
    """The sampling seed of one dialogue: independent of which other prompts run, and of their order."""
    return int(np.random.SeedSequence([seed, zlib.crc32(prompt_id.encode()), sample]).generate_state(1)[0])


# ── dialogues ───────────────────────────────────────────────────────────────────────────────────────────────────


def dialogue_rows(records: Sequence[PromptRecord], samples: Sequence[int], dialogues: Sequence[Any]) -> list[dict]:
    """Rows of the dialogues table; `dialogues` are `actors.llm.virtue.dialogue.Dialogue`s in the order of records."""
    rows = []
    for rec, sample, d in zip(records, samples, dialogues, strict=True):
        row: dict[str, Any] = {"prompt_id": rec.id, "split": rec.split, "prompt": rec.prompt, "sample": sample}
        for name, turn in zip(TURNS, d.turns, strict=True):
            row[name] = turn.text
            row[f"{name}_tokens"] = len(turn.token_ids)
            row[f"{name}_truncated"] = turn.truncated
        rows.append(row)
    return rows


def truncation_rates(dialogues: pl.DataFrame) -> dict[str, float]:
    """Share of answers cut off at their token limit, per turn."""
    return {t: float(np.mean(dialogues[f"{t}_truncated"].to_numpy())) for t in TURNS}


# ── judgements and preferences ──────────────────────────────────────────────────────────────────────────────────


def pairs_table(dialogues: pl.DataFrame) -> pl.DataFrame:
    """One row per prompt with both samples side by side: `<turn>_a` (sample 0) and `<turn>_b` (sample 1)."""
    a = dialogues.filter(pl.col("sample") == 0).select("prompt_id", "split", "prompt", *TURNS)
    b = dialogues.filter(pl.col("sample") == 1).select("prompt_id", *TURNS)
    out = a.join(b, on="prompt_id", suffix="_b", maintain_order="left").rename({t: f"{t}_a" for t in TURNS})
    missing = a.height - out.height
    if missing or a.height != b.height:
        raise CorruptDataError(f"dialogues table: {a.height} first and {b.height} second samples; every prompt needs two")
    return out


def judgement_rows(keys: Sequence[Mapping[str, Any]], probs: np.ndarray, margin: float, rule: str = "average"
                   ) -> list[dict]:
    """Rows of the judgements table from (N, V, 2 orders, 2 labels) probabilities; keys carry prompt_id, split, turn."""
    p_ab = label_share(probs[:, :, 0, 0], probs[:, :, 0, 1])  # (N, V) P(first shown is better), A first
    p_ba = label_share(probs[:, :, 1, 0], probs[:, :, 1, 1])  # B first
    winners = virtue_winners(p_ab, p_ba, margin, rule)
    maj = majority(winners)
    p_a = prob_a_better(p_ab, p_ba)
    rows = []
    for i, key in enumerate(keys):
        row = dict(key)
        for v, virtue in enumerate(VIRTUES):
            row[f"{virtue}_p1_ab"], row[f"{virtue}_p2_ab"] = float(probs[i, v, 0, 0]), float(probs[i, v, 0, 1])
            row[f"{virtue}_p1_ba"], row[f"{virtue}_p2_ba"] = float(probs[i, v, 1, 0]), float(probs[i, v, 1, 1])
            row[f"{virtue}_p_a"] = float(p_a[i, v])
            row[f"{virtue}_winner"] = int(winners[i, v])
        row.update(points_a=int(maj.points_a[i]), points_b=int(maj.points_b[i]), outcome=int(maj.outcome[i]))
        rows.append(row)
    return rows


def _side(answers: Sequence[str], upto: int) -> list[Message]:
    """A dialogue's messages after the prompt, ending with answer `upto`."""
    msgs: list[Message] = []
    for k in range(upto + 1):
        if k:
            msgs.append({"role": "user", "content": FOLLOW_UPS[TURNS[k]]})
        msgs.append({"role": "assistant", "content": answers[k]})
    return msgs


def preference_datasets(pairs: pl.DataFrame, judgements: pl.DataFrame, system: str | None) -> dict[str, pl.DataFrame]:
    """The three TRL preference datasets (module docstring), tied pairs left out."""
    verdict_cols = [c for c in judgements.columns if c.split("_")[0] in VIRTUES]
    joined = judgements.join(pairs.drop("split"), on="prompt_id", maintain_order="left")
    out = {}
    for k, turn in enumerate(TURNS):
        rows = []
        for r in joined.filter((pl.col("turn") == turn) & (pl.col("outcome") != 0)).iter_rows(named=True):
            a = [r[f"{t}_a"] for t in TURNS]
            b = [r[f"{t}_b"] for t in TURNS]
            chosen, rejected = (a, b) if r["outcome"] > 0 else (b, a)
            row = {
                "prompt_id": r["prompt_id"],
                "split": r["split"],
                "prompt": dialogue_messages(r["prompt"], [], system),
                "chosen": _side(chosen, k),
                "rejected": _side(rejected, k),
                "chosen_sample": 0 if r["outcome"] > 0 else 1,
                "points_chosen": max(r["points_a"], r["points_b"]),
                "points_rejected": min(r["points_a"], r["points_b"]),
            }
            row.update({c: r[c] for c in verdict_cols})
            rows.append(row)
        out[turn] = pl.DataFrame(rows, schema=_preference_schema(verdict_cols) if not rows else None)
    return out


def _preference_schema(verdict_cols: Sequence[str]) -> dict[str, Any]:
    msg = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
    schema: dict[str, Any] = {"prompt_id": pl.String, "split": pl.String, "prompt": msg, "chosen": msg, "rejected": msg,
                              "chosen_sample": pl.Int64, "points_chosen": pl.Int64, "points_rejected": pl.Int64}
    schema.update({c: pl.Int64 if c.endswith("_winner") else pl.Float64 for c in verdict_cols})
    return schema


# ── labelled pairs (the judge's check, the supervised judge, the reward models' accuracy) ──────────────────────

LABELLED_COLUMNS = ("id", "set", "subset", "split", "turn", "question", "good", "bad")
LABELLED_SPLITS = ("check", "train")


def load_labelled(paths: Sequence[str | os.PathLike[str]]) -> pl.DataFrame:
    """Labelled pairs from JSONL files: id, set, subset, split (check | train), turn, question, good, bad."""
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"labelled pair file {path} does not exist; expected JSONL with the fields "
                              f"{', '.join(LABELLED_COLUMNS)}")
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, OSError) as e:
            raise CorruptDataError(f"cannot read labelled pairs from {path}: {e}") from e
        for k, row in enumerate(rows):
            missing = [c for c in LABELLED_COLUMNS if not isinstance(row.get(c), str) or not row[c].strip()]
            if missing:
                raise ConfigError(f"{path} row {k}: missing or empty {', '.join(missing)}")
            if row["split"] not in LABELLED_SPLITS or row["turn"] not in TURNS:
                raise ConfigError(f"{path} row {k}: split must be one of {', '.join(LABELLED_SPLITS)} and turn one "
                                  f"of {', '.join(TURNS)}, got {row['split']!r}, {row['turn']!r}")
        frames.append(pl.DataFrame([{c: r[c] for c in LABELLED_COLUMNS} for r in rows],
                                   schema=dict.fromkeys(LABELLED_COLUMNS, pl.String)))
    if not frames:
        raise ConfigError("no labelled pair files given")
    df = pl.concat(frames)
    dup = df.filter(pl.col("id").is_duplicated())["id"].to_list()
    if dup:
        raise ConfigError(f"labelled pairs: duplicate id {dup[0]!r}")
    return df


def labelled_preference_rows(df: pl.DataFrame) -> list[dict[str, Any]]:
    """Labelled pairs as TRL preference rows (the good answer chosen), for the supervised judge."""
    out = []
    for r in df.iter_rows(named=True):
        user = r["question"] if r["turn"] == "action" else f"{r['question']}\n\n{FOLLOW_UPS[r['turn']]}"
        out.append({"prompt": [{"role": "user", "content": user}],
                    "chosen": [{"role": "assistant", "content": r["good"]}],
                    "rejected": [{"role": "assistant", "content": r["bad"]}]})
    return out


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    """Write beside the target, then rename: a crash never leaves a half file that a resumed stage takes as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.write_parquet(tmp)
    os.replace(tmp, path)


def write_json_atomic(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
