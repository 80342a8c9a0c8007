"""The entrance: the command line and the scenario file resolve once into one Job (scenarios/run.py), with flags and
scenario keys generated from the config dataclasses' fields (scenarios/options.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from scenarios.options import Table, add_table, check_keys, field_docs, given
from scenarios.run import DEFAULT_POPULATION, LLM_CHECKPOINT_EVERY, TABLES, build_parser, resolve
from simulator.errors import ConfigError


@dataclass(frozen=True)
class _Example:
    speed: float = 1.5
    """how fast it goes"""
    name: str | None = None  # a trailing comment is help too
    on: bool = True


def test_a_new_field_is_a_flag_with_its_docstring_as_help_and_a_scenario_key():
    table = Table("example", _Example, "ex_", "an example")
    parser = argparse.ArgumentParser()
    add_table(parser, table)
    help_text = " ".join(parser.format_help().split())
    assert "--ex_speed SPEED how fast it goes (default: 1.5)" in help_text
    assert "--ex_name NAME a trailing comment is help too (default: None)" in help_text
    assert "--ex_on, --no-ex_on" in help_text
    ns = parser.parse_args(["--ex_speed", "2", "--ex_name", "none", "--no-ex_on"])
    assert given(ns, table) == {"speed": 2.0, "name": None, "on": False}
    assert given(parser.parse_args([]), table) == {}  # flags not given are absent: the scenario's value stays
    assert field_docs(_Example) == {"speed": "how fast it goes", "name": "a trailing comment is help too"}
    with pytest.raises(ConfigError, match=r"unknown key 'sped' in \[example\]; did you mean 'speed'\? Valid: name, on, speed"):
        check_keys("scenario x.toml", table, {"sped": 1})


def test_every_config_field_is_an_option_once():
    flags = [a.option_strings[0] for a in build_parser()._actions if a.option_strings]
    assert len(flags) == len(set(flags))
    for table in TABLES:
        for f in table.options():
            assert table.flag(f.name) in flags


def test_defaults_then_scenario_then_flags(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('[run]\ndestination_folder = "1xUT@llm_1xTFT"\nnum_iterations = 7\nseed = 3\n'
                    '[llm]\nanswer_mode = "mask"\ntemperature = 0.5\n[llm.actors]\nlearner_actors = 2\n'
                    '[ppo]\nbatch_size = 4\nlearning_rate = 0.01\n[dqn]\nhidden = 32\n')
    job = resolve(["--scenario", str(toml), "--seed", "9", "--llm_temperature", "0.7", "--ppo_batch_size", "2",
                   "--backend", "inline"])
    (cfg,) = job.runs
    assert (cfg.destination_folder, cfg.num_iterations, cfg.seed) == ("1xUT@llm_1xTFT", 7, 9)
    llm = cfg.agents.llm
    assert (llm.answer_mode, llm.temperature, llm.actors.learner_actors) == ("mask", 0.7, 2)
    assert (llm.ppo.batch_size, llm.ppo.mini_batch_size, llm.ppo.learning_rate) == (2, 2, 0.01)
    assert cfg.agents.dqn.hidden == 32
    assert cfg.checkpoint_every == LLM_CHECKPOINT_EVERY and job.launch.backend == "inline" and job.has_llm
    default = resolve([])
    assert default.runs[0].destination_folder == DEFAULT_POPULATION and default.runs[0].agents.llm is None
    assert default.runs[0].checkpoint_every == 0


def test_one_rule_for_learned_selection():
    """Two paths once computed it differently: now the factory and the engine both read RunConfig."""
    assert resolve(["--random_matching"]).runs[0].learns_selection is False
    pair = resolve(["--destination_folder", "1xUT_1xTFT", "--protocol", "pair"]).runs[0]
    assert pair.learns_selection is False and pair.random_matching is False
    assert resolve([]).runs[0].learns_selection is True
    llm_pair = resolve(["--destination_folder", "1xUT@llm_1xTFT", "--protocol", "pair", "--llm_selection", "prompt"])
    assert llm_pair.runs[0].agents.llm.selection == "random"  # two agents: nothing to select


def test_the_population_is_parsed_once_per_population(monkeypatch, tmp_path):
    """Parsed once in RunConfig (plus once up front to tell whether the job has LLM agents)."""
    import simulator.config
    import simulator.population

    calls = []
    real = simulator.population.parse_population

    def counting(text):  # type: ignore[no-untyped-def]
        calls.append(text)
        return real(text)

    monkeypatch.setattr(simulator.config, "parse_population", counting)
    import scenarios.run

    monkeypatch.setattr(scenarios.run, "parse_population", counting)
    from scenarios.cli import main

    assert main(["--destination_folder", "2xUT_1xDE", "--num_iterations", "5", "--num_runs", "2", "--backend",
                 "inline", "--no_progress", "--no-report", "--output", str(tmp_path)]) == 0
    assert calls == ["2xUT_1xDE", "2xUT_1xDE"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--llm_answer_mode", "maks", "--learner", "llm"], "unknown answer_mode 'maks'; valid: free, mask"),
    (["--ppo_batch_size", "x"], "--ppo_batch_size: expected int, got 'x'"),
    (["--dqn_hidden", "0"], "dqn.hidden must be > 0, got 0"),
    (["--tabular_gamma", "1.5"], "tabular.gamma must be in [0, 1], got 1.5"),
])
def test_bad_values_get_one_line(argv, message, capsys, tmp_path):
    from scenarios.cli import main

    with pytest.raises(SystemExit) as info:
        main([*argv, "--num_iterations", "1", "--num_runs", "1", "--backend", "inline", "--output", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if message:
        assert message in err


def test_unknown_scenario_keys_and_tables_name_the_closest(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[llm]\nanswer_mod = "mask"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'answer_mod' in \[llm\]; did you mean 'answer_mode'\?"):
        resolve(["--scenario", str(bad)])
    bad.write_text('[dqn]\nhiden = 3\n')
    with pytest.raises(ConfigError, match=r"did you mean 'hidden'\?"):
        resolve(["--scenario", str(bad)])
    bad.write_text('[ppp]\nbatch_size = 3\n')
    with pytest.raises(ConfigError, match=r"unknown table 'ppp'; did you mean 'ppo'\?"):
        resolve(["--scenario", str(bad)])


def test_every_shipped_scenario_resolves():
    from scenarios.scenario import available

    seen: dict[str, dict] = {}
    for name in available():
        job = resolve(["--scenario", name])
        assert job.runs, name
        for c in job.runs:  # two scenarios share a dataset only when they run the same thing (the paper population
            # is the sweep's first): different experiments never write into one folder
            assert seen.setdefault(str(c.dataset_location), c.identity()) == c.identity(), (name, c.dataset_location)


def test_the_manifest_identity_lists_the_learner_settings():
    cfg = resolve(["--destination_folder", "1xUT_1xDE@tabularQ", "--dqn_hidden", "64"]).runs[0]
    ident = cfg.identity()
    assert ident["agent_options"] == {"dqn": {"hidden": 64}}  # only what differs: older datasets still resume
    assert "population" not in ident and "agents" not in ident
    assert resolve([]).runs[0].identity()["agent_options"] == {}
    llm = resolve(["--destination_folder", "1xUT@llm_1xTFT", "--llm_rollout_actors", "1"]).runs[0].identity()
    assert llm["agent_options"]["llm"]["actors"]["rollout_actors"] == 1
    assert llm["agent_options"]["ppo"]["batch_size"] == 5


def test_a_run_ends_with_the_summary_and_the_report_command(tmp_path, caplog):
    import logging

    import polars as pl

    from analysis.modes import final_cooperation
    from scenarios.cli import main
    from tests.helpers import read_dataset

    caplog.set_level(logging.INFO, logger="moralsim")
    assert main(["--destination_folder", "1xUT_1xaUT_1xDE", "--num_iterations", "40", "--num_runs", "3", "--backend",
                 "inline", "--no_progress", "--no-report", "--output", str(tmp_path)]) == 0
    text = caplog.text
    assert "cooperation over the last 10% of iterations (4 of 40), 3 runs" in text
    assert f"python -m analysis '{tmp_path / '1xUT_1xaUT_1xDE'}'" in text
    assert not (tmp_path / "1xUT_1xaUT_1xDE" / "report").exists()  # --no-report
    # the printed means are the per-run final cooperation averaged over runs
    final = final_cooperation(read_dataset(tmp_path / "1xUT_1xaUT_1xDE").lazy(), 40).collect()
    for t in ("UT", "aUT", "DE"):
        mean = final.filter(pl.col("type") == t)["cooperation"].mean()
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{t} "))
        assert line.split()[1] == f"{mean:.2f}"
        assert sum(int(x) for x in line.split("    ")[-1].split(" / ")) == 3  # every run in one mode


def test_the_pair_protocol_plays_one_ppo_batch_per_episode():
    argv = ["--destination_folder", "1xDe@llm_1xTFT", "--protocol", "pair", "--episode_length", "5"]
    assert resolve([*argv, "--ppo_batch_size", "5"]).runs[0].episode_length == 5
    with pytest.raises(ConfigError, match=r"episode_length \(5\) must equal the PPO batch size \(3\)"):
        resolve([*argv, "--ppo_batch_size", "3"])
