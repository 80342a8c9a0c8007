"""Test-time generalisation of an LLM agent (ICLR 2025, DESIGN section 4): `python main.py evaluate --adapter DIR`.

The matrix, each cell answered by `--samples` prompts with random last-round histories (or a first round):
    games     IPD, ISH, IVD, ICN, BOS, ICD        with the test tokens (action3/action4), structured prompt
    tokens    action12, action34, AB, XY, 01, random:3, random:7   on IPD, structured prompt
    variants  structured, reversed, permuted, unstructured, value_ut, value_de, poetic   on IPD, test tokens
    unrelated questions that have nothing to do with the game, answered with the test tokens
`--full` crosses all games x tokens x variants instead. `--variant paper` words the game and token axes as the paper
did (an adapter trained on the paper's prompt; the variant axis then holds it too). Answers end as in training
(actors/llm/answers.py): each token pair's length in tokens, no EOS stop; `--answer_mode mask` restricts them to the
two legal answers, as the CPU demo trained (then the illegal rate is 0 by construction and cooperation is the measure).
`--all FOLDER` evaluates every saved adapter under FOLDER (a dataset, or a job's output such as
results/iclr2025_jobs: the job file's inference part), each with its dataset's base model, answer mode and prompt
wording, into `<adapter>/eval/`, skipping adapters already evaluated; the job's report then draws the
generalisation figures across seeds (re-run the job command, or `python -m analysis`).
Output: `<out>/eval.parquet` (one row per answer: model, adapter, answer_mode, axis, game, action_tokens,
prompt_variant, history, raw_answer, legal, action, p_cooperate) and
`<out>/eval_table.csv` (cooperation and illegal-answer rate per cell), also printed as a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from simulator.errors import MoralsimError
from simulator.games import GAMES

log = logging.getLogger("moralsim.evaluate")

EVAL_GAMES = ("IPD", "ISH", "IVD", "ICN", "BOS", "ICD")
EVAL_TOKENS = ("action12", "action34", "AB", "XY", "01", "random:3", "random:7")
TEST_TOKENS = "action34"
HISTORIES = ("first", "CC", "CD", "DC", "DD")  # own last move, opponent's last move


def _cells(full: bool, baseline: str = "structured") -> list[tuple[str, str, str, str]]:
    from actors.llm.prompts import EVAL_VARIANTS, check_variant

    check_variant(baseline)
    variants = EVAL_VARIANTS if baseline in EVAL_VARIANTS else (baseline, *EVAL_VARIANTS)
    if full:
        return [("full", g, t, v) for g, t, v in itertools.product(EVAL_GAMES, EVAL_TOKENS, variants)]
    return (
        [("game", g, TEST_TOKENS, baseline) for g in EVAL_GAMES]
        + [("tokens", "IPD", t, baseline) for t in EVAL_TOKENS]
        + [("variant", "IPD", TEST_TOKENS, v) for v in variants]
        + [("unrelated", "-", TEST_TOKENS, "unrelated")]
    )


def evaluate(
    model: str,
    adapter: Path | None,
    out: Path,
    *,
    samples: int = 10,
    full: bool = False,
    engine_kind: str = "hf",
    device: str = "cpu",
    seed: int = 0,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    answer_mode: str = "free",
    variant: str = "structured",
) -> pl.DataFrame:
    """Run the matrix for one model (+ adapter); write the Parquet and the table; return the table."""
    from actors.llm.agent import resolve_tokens
    from actors.llm.answers import ANSWER_MODES, AnswerTrie, answer_length, sample_masked
    from actors.llm.engine import GenerationRequest, legal_share, make_engine
    from actors.llm.models import resolve_model
    from actors.llm.prompts import UNRELATED_QUESTIONS, chat_ids, game_prompt_text, parse_answer, unrelated_prompt_text
    from actors.llm.rollouts import cooperation_probability
    from actors.llm.weight_sync import peft_dir_to_adapter
    from simulator.contracts import Action

    if answer_mode not in ANSWER_MODES:
        raise MoralsimError(f"unknown answer_mode {answer_mode!r}; valid: {', '.join(ANSWER_MODES)}")
    model_dir = resolve_model(model)
    engine = make_engine(engine_kind, model_dir, device=device, seed=seed)
    name = None
    if adapter is not None:
        name = "evaluated"  # not "eval": peft adapter names become module attributes
        engine.load_adapter(peft_dir_to_adapter(adapter, name, 0))
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    prompts: list[list[int]] = []
    row_tokens: list[Any] = []  # the TokenPair of each row
    for axis, game_id, tokens_spec, cell_variant in _cells(full, variant):
        tokens: Any = resolve_tokens(tokens_spec, rng)
        for k in range(samples):
            if cell_variant == "unrelated":
                text, history = unrelated_prompt_text(UNRELATED_QUESTIONS[k % len(UNRELATED_QUESTIONS)], tokens, rng), "-"
            else:
                history = HISTORIES[int(rng.integers(len(HISTORIES)))]
                own, opp = (None, None) if history == "first" else (Action("CD".index(history[0])),
                                                                   Action("CD".index(history[1])))
                text = game_prompt_text(GAMES[game_id], tokens, own, opp, rng, cell_variant)
            prompts.append(chat_ids(tokenizer, text))
            rows.append(dict(model=str(model), adapter=str(adapter) if adapter else "base", answer_mode=answer_mode,
                             axis=axis, game=game_id,
                             action_tokens=f"{tokens.c}|{tokens.d}", prompt_variant=cell_variant, history=history))
            row_tokens.append(tokens)
    by_tokens: dict[str, list[int]] = {}  # rows sharing a token pair are scored (and masked) in one call
    for k, row in enumerate(rows):
        by_tokens.setdefault(str(row["action_tokens"]), []).append(k)
    texts: list[str] = [""] * len(rows)
    if answer_mode == "free":
        lengths = [max_new_tokens or answer_length(tokenizer, (t.c, t.d)) for t in row_tokens]
        results = engine.generate([GenerationRequest(tuple(p), name, n, temperature, stop_at_eos=False)
                                   for p, n in zip(prompts, lengths, strict=True)])
        texts = [res.text for res in results]
    for ks in by_tokens.values():
        tokens = row_tokens[ks[0]]
        if answer_mode == "mask":  # one scoring call gives both the masked answer and P(C): the same two sequences
            trie = AnswerTrie.from_texts(tokenizer, (tokens.c, tokens.d))
            seqs = [list(q) for q in trie.sequences]
            raw = engine.score_batch([name] * (2 * len(ks)), [prompts[k] for k in ks for _ in seqs], seqs * len(ks))
            totals = np.array([sum(r) for r in raw]).reshape(len(ks), 2)
            p_c = legal_share(totals[:, 0], totals[:, 1])
            for j, k in enumerate(ks):
                pick, _ = sample_masked(trie, raw[2 * j : 2 * j + 2], rng.random(max(map(len, seqs))), temperature)
                texts[k] = (tokens.c, tokens.d)[pick]
        else:
            p_c = cooperation_probability(engine, tokenizer, tokens, [name] * len(ks), [prompts[k] for k in ks])
        for k, p in zip(ks, p_c.tolist(), strict=True):
            rows[k]["p_cooperate"] = p
    for row, tokens, text in zip(rows, row_tokens, texts, strict=True):
        act = parse_answer(text, tokens, period=variant != "paper")  # the paper parsed whitespace-stripped only
        row.update(raw_answer=text, legal=act is not None, action=None if act is None else int(act))
    out.mkdir(parents=True, exist_ok=True)
    df = pl.DataFrame(rows).with_columns(pl.col("action").cast(pl.Int8), pl.col("p_cooperate").cast(pl.Float32))
    df.write_parquet(out / "eval.parquet")
    table = generalisation_table(df.lazy()).collect()
    table.write_csv(out / "eval_table.csv")
    return table


def generalisation_table(df: pl.LazyFrame) -> pl.LazyFrame:
    """Per cell: answers, cooperation rate among legal answers, illegal-answer rate, mean P(cooperate)."""
    return (
        df.group_by("axis", "game", "action_tokens", "prompt_variant", maintain_order=True)
        .agg(
            pl.len().alias("answers"),
            (pl.col("action") == 0).sum().truediv(pl.col("legal").sum()).alias("cooperation_rate"),
            (~pl.col("legal")).mean().alias("illegal_rate"),
            pl.col("p_cooperate").mean().alias("mean_p_cooperate"),
        )
    )


ADAPTER_GLOB = "run=*/adapters/slot*"  # what a run saves (analysis.llm_compare.EVAL_GLOB reads their eval/)


def saved_adapters(root: Path) -> list[Path]:
    """Every saved adapter under `root` (a dataset folder or any folder above datasets), in path order."""
    found = [root.glob(ADAPTER_GLOB), root.rglob(f"*/{ADAPTER_GLOB}")]
    return sorted({p for g in found for p in g if (p / "adapter_config.json").is_file()})


def training_settings(adapter: Path) -> dict[str, Any]:
    """The LLM settings of the run that saved `adapter` (its dataset's manifest), {} when there is none."""
    manifest = adapter.parents[2] / "manifest.json"
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return {}
    return dict(((doc.get("config") or {}).get("agent_options") or {}).get("llm") or {})


def evaluate_all(root: Path, *, model: str | None = None, answer_mode: str | None = None, variant: str | None = None,
                 **kwargs: Any) -> list[Path]:
    """`evaluate` on every saved adapter under `root` not evaluated yet, each as its run trained (model, answer
    mode, the paper's wording or not) unless given; returns the evaluation folders written."""
    adapters = saved_adapters(root)
    if not adapters:
        raise MoralsimError(f"no saved adapter ({ADAPTER_GLOB}/adapter_config.json) under {root}")
    done = []
    for k, adapter in enumerate(adapters, 1):
        out = adapter / "eval"
        if (out / "eval.parquet").is_file():
            log.info("[%d/%d] %s: evaluated already", k, len(adapters), adapter)
            continue
        trained = training_settings(adapter)
        wording = variant or ("paper" if trained.get("variant") == "paper" else "structured")
        log.info("[%d/%d] evaluating %s", k, len(adapters), adapter)
        evaluate(model or str(trained.get("model") or "smollm2-135m-instruct"), adapter, out,
                 answer_mode=answer_mode or str(trained.get("answer_mode") or "free"), variant=wording, **kwargs)
        done.append(out)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="main.py evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", type=Path, default=None,
                   help="a saved adapter folder, e.g. results/<folder>/run=0/adapters/slot0 (default: the base model)")
    p.add_argument("--all", type=Path, default=None, dest="all_under", metavar="FOLDER",
                   help="evaluate every saved adapter under FOLDER (a dataset or a job's output) not evaluated yet, "
                        "each as its run trained unless --model / --answer_mode / --variant say otherwise")
    p.add_argument("--model", default=None, help="the base model the adapter was trained on (default: "
                   "smollm2-135m-instruct; with --all, each dataset's own)")
    p.add_argument("--output", type=Path, default=None, help="output folder (default: <adapter>/eval or eval_base)")
    p.add_argument("--samples", type=int, default=10, help="prompts per cell (default 10)")
    p.add_argument("--full", action="store_true", help="cross all games x tokens x variants")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--answer_mode", choices=("free", "mask"), default=None,
                   help="free: sample freely (the paper; the default); mask: only the two legal answers (as the CPU "
                        "demo trained); with --all, each dataset's own")
    p.add_argument("--variant", default=None,
                   help="prompt of the game and token axes: structured, or paper (the paper's wording and its parsing, "
                        "no trailing period; for an adapter trained on it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.all_under is not None:
        if args.adapter is not None or args.output is not None:
            p.exit(2, "main.py evaluate: error: --all evaluates every adapter into its own eval/ folder; "
                      "drop --adapter and --output\n")
        try:
            done = evaluate_all(args.all_under, model=args.model, answer_mode=args.answer_mode, variant=args.variant,
                                samples=args.samples, full=args.full, engine_kind=args.engine, device=args.device,
                                seed=args.seed)
        except MoralsimError as e:
            p.exit(2, f"main.py evaluate: error: {e}\n")
        log.info("evaluated %d adapter(s) under %s", len(done), args.all_under)
        return 0
    if args.adapter is not None and not (args.adapter / "adapter_config.json").exists():
        p.exit(2, f"main.py evaluate: error: {args.adapter} is not an adapter folder (no adapter_config.json)\n")
    out = args.output or (args.adapter / "eval" if args.adapter else Path("eval_base"))
    try:
        table = evaluate(args.model or "smollm2-135m-instruct", args.adapter, out, samples=args.samples,
                         full=args.full, engine_kind=args.engine, device=args.device, seed=args.seed,
                         answer_mode=args.answer_mode or "free", variant=args.variant or "structured")
    except MoralsimError as e:
        p.exit(2, f"main.py evaluate: error: {e}\n")
    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=40):
        print(table)
    log.info("wrote %s and %s", out / "eval.parquet", out / "eval_table.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
