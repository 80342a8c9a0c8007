"""What a new user hits first: a Ray address with no cluster, an absurd population, a typo in the population string,
an output folder that cannot be written. Each fails fast, before any work, with a message that says what to do."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import pytest

from simulator.cluster import GCS_PROBE_METHOD, check_reachable, is_connected, split_address
from simulator.config import RunConfig
from simulator.errors import ClusterError, ConfigError, PopulationSpecError
from simulator.population import MAX_AGENTS, parse_population, valid_codes
from simulator.resources import GiB, batch_sizes, check_run_memory, estimate_batch

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    return proc, time.perf_counter() - t0


def refused(proc: subprocess.CompletedProcess[str]) -> str:
    """The CLI's one-line error: exit status 2, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "main.py: error:" in proc.stderr
    return proc.stderr


# -- 1. a Ray address where no cluster answers ----------------------------------------------------------------
@pytest.mark.parametrize("population", ["1xS_1xUT", "1xS"])
def test_cli_ray_address_without_cluster_fails_fast(tmp_path, population):
    """The issue's command hung for minutes in GCS retries at 0%."""
    out = tmp_path / "out"
    proc, seconds = cli("--destination_folder", population, "--ray_address", "127.0.0.1:1", "--num_iterations", "5",
                        "--num_runs", "2", "--output", str(out), "--no_progress")
    err = refused(proc)
    assert seconds < 30, seconds
    if population == "1xS":  # the population is checked first, and says what is wrong with it
        assert "at least 2" in err
    else:
        assert "no Ray cluster answered at '127.0.0.1:1'" in err and "Connection refused" in err
        assert "ray start --head" in err and "leave out --ray_address" in err
    assert not (out / population).exists()


def _silent_listener() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    return srv, srv.getsockname()[1]


def test_open_port_that_never_answers_is_refused_within_the_timeout():
    srv, port = _silent_listener()
    try:
        t0 = time.perf_counter()
        with pytest.raises(ClusterError, match=f"127.0.0.1:{port} accepts connections but did not answer"):
            check_reachable(f"127.0.0.1:{port}", timeout_s=2)
        assert time.perf_counter() - t0 < 6
    finally:
        srv.close()


def _grpc_server(methods: dict[str, bytes]):  # type: ignore[no-untyped-def]
    grpc = pytest.importorskip("grpc")

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):  # type: ignore[no-untyped-def]
            if details.method in methods:
                reply = methods[details.method]
                return grpc.unary_unary_rpc_method_handler(lambda request, context: reply)
            return None

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((Handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_grpc_server_that_is_no_ray_gcs_is_refused():
    server, port = _grpc_server({})
    try:
        t0 = time.perf_counter()
        with pytest.raises(ClusterError, match="answers, but not as a Ray GCS"):
            check_reachable(f"127.0.0.1:{port}", timeout_s=10)
        assert time.perf_counter() - t0 < 10
    finally:
        server.stop(0)


def test_something_answering_like_a_gcs_passes_the_check():
    server, port = _grpc_server({GCS_PROBE_METHOD: b"\n\x1c" + b"c" * 28})
    try:
        check_reachable(f"127.0.0.1:{port}", timeout_s=10)
        check_reachable(f"ray://127.0.0.1:{port}", timeout_s=10)  # the client server: the handshake is the check
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    ("address", "message"),
    [("nosuchhost.invalid:6379", "cannot resolve host 'nosuchhost.invalid'"),
     ("127.0.0.1:99999", "not a number in 1..65535"),
     ("ray://:10001", "expected host:port")],
)
def test_bad_addresses_are_named(address, message):
    with pytest.raises(ClusterError, match=message) as err:
        check_reachable(address, timeout_s=5)
    assert repr(address) in str(err.value)


def test_split_address_defaults():
    assert split_address("10.0.0.5") == ("10.0.0.5", 6379)
    assert split_address("ray://head") == ("head", 10001)
    assert split_address("ray://head:20001") == ("head", 20001)
    assert split_address("[::1]:6380") == ("::1", 6380)


def test_driver_api_fails_fast_too(tmp_path):
    """run_sweep(..., ray_address=...) goes through simulator.cluster.connect, like the CLI."""
    if is_connected():
        pytest.skip("Ray is already initialised in this test process")

    from scenarios.factory import build_groups
    from simulator.driver import run_sweep

    cfg = RunConfig("1xS_1xUT", num_iterations=3, num_runs=1, output=tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(ClusterError, match=r"127\.0\.0\.1:1"):
        run_sweep(cfg, build_groups, backend="ray", ray_address="127.0.0.1:1",
                  show_progress=False)
    assert time.perf_counter() - t0 < 30


# -- 2. populations too large for the machine ------------------------------------------------------------------
@pytest.mark.parametrize(("population", "message"), [
    ("99999999999xS", f"asks for 99999999999 agents in entry '99999999999xS'; at most {MAX_AGENTS}"),
    ("1" * 5000 + "xS", "a 5000-digit number of agents"),  # int() of it would raise ValueError (4300 digits)
    ("40000xS_40000xUT", f"at most {MAX_AGENTS} agents are supported in all"),
])
def test_absurd_counts_are_refused_before_allocating(population, message):
    t0 = time.perf_counter()
    with pytest.raises(PopulationSpecError, match=message):
        parse_population(population)
    assert time.perf_counter() - t0 < 1


def test_cli_absurd_population_is_refused_without_memory_error(tmp_path):
    out = tmp_path / "out"
    proc, _ = cli("--destination_folder", "99999999999xS", "--output", str(out))
    err = refused(proc)
    assert "MemoryError" not in err and "at most 65536 agents" in err
    assert not out.exists()


def test_cli_population_too_large_for_memory_states_estimate_and_memory(tmp_path):
    """20,000 DQN agents: their selection networks alone need terabytes; refused before anything is allocated."""
    out = tmp_path / "out"
    proc, seconds = cli("--destination_folder", "20000xS", "--num_iterations", "1", "--num_runs", "1",
                        "--output", str(out))
    err = refused(proc)
    assert "needs about" in err and "DQN networks" in err and "in all" in err and "available now" in err
    assert "smaller population" in err
    assert seconds < 30 and not out.exists()


def test_memory_estimate_refuses_and_advises():
    cfg = RunConfig("300xS", num_runs=1)
    est = estimate_batch(cfg, 1)
    assert 0.5 * GiB < est.parts["DQN networks"] < 1 * GiB  # 300 x (2 x 299 x 256) floats, three copies
    with pytest.raises(ConfigError, match=r"needs about .* more than this machine has: 0.5 GiB in all, 0.4 GiB "
                                          r"available now\. Use a smaller population"):
        check_run_memory([cfg], backend="inline", memory=(GiB // 2, 2 * GiB // 5))
    # one run fits, 16 at once (a local Ray on 16 CPUs) do not: the advice is to hold fewer runs at once
    many = RunConfig("300xS", num_runs=16)
    assert check_run_memory([many], backend="inline", runs_per_batch=1, memory=(4 * GiB, 4 * GiB))
    with pytest.raises(ConfigError, match="--runs_per_batch 1 --num_cpus"):
        check_run_memory([many], backend="ray", num_cpus=16, runs_per_batch=1, memory=(4 * GiB, 4 * GiB))
    # joining a cluster: its nodes' memory is not this machine's, so nothing is checked here
    assert check_run_memory([many], backend="ray", ray_address="10.0.0.5:6379", memory=(GiB, GiB)) is None


def test_default_run_fits_comfortably():
    cfg = RunConfig("1xUT_1xaUT_1xDE", num_runs=20)
    peak = check_run_memory([cfg], backend="ray", num_cpus=2, memory=(4 * GiB, 4 * GiB))
    assert peak is not None and peak < 3 * GiB  # mostly the processes: driver, 2 Ray workers, Ray itself


@pytest.mark.parametrize(("population", "runs", "workers", "per"), [
    ("1xUT_1xaUT_1xDE", 20, 2, None), ("1xUT_1xaUT_1xDE", 7, 3, None), ("1000xS", 5, 16, None),
    ("3000xS", 2, 1, None), ("2xS", 10, 4, 3),
])
def test_batch_sizes_match_the_driver(population, runs, workers, per):
    from simulator.driver import plan_batches

    cfg = RunConfig(population, num_runs=runs)
    pending = list(range(runs))
    planned = ([pending[i : i + per] for i in range(0, runs, per)] if per
               else plan_batches(pending, workers, cfg.population.size))
    expect: dict[int, int] = {}
    for b in planned:
        expect[len(b)] = expect.get(len(b), 0) + 1
    assert batch_sizes(cfg, workers, per) == expect


def test_memory_estimate_matches_what_a_run_allocates():
    """Anonymous memory (not the shared libraries, which the kernel may evict) of a real engine with 150 DQN agents
    after two iterations, in a fresh process, is within a factor of the estimate."""
    code = (
        "from functools import partial\n"
        "from scenarios.factory import build_groups\n"
        "from simulator.config import RunConfig\n"
        "from simulator.driver import build_engine\n"
        "from simulator.resources import estimate_batch\n"
        "def anon():\n"
        "    line = next(x for x in open('/proc/self/status') if x.startswith('RssAnon:'))\n"
        "    return int(line.split()[1]) * 1024\n"
        "cfg = RunConfig('150xS', num_iterations=2, num_runs=1)\n"
        "before = anon()\n"
        "engine, _ = build_engine(cfg, [0], build_groups)\n"
        "records = [engine.step() for _ in range(2)]\n"
        "print(anon() - before, estimate_batch(cfg, 1).total)\n"
    )
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    grown, estimate = map(int, proc.stdout.split())
    assert 0.5 * estimate < grown < 1.5 * estimate, (grown, estimate)


# -- 3. malformed population strings get sensible suggestions --------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected", "absent"),
    [
        ("1x S", ["contains whitespace", "did you mean '1xS'?", "needs at least 2"], ["1xx", "'1xS_1xS'"]),
        (" 1xS", ["contains whitespace", "did you mean '1xS'?"], ["1xx"]),
        ("1x S_1xUT", ["contains whitespace", "did you mean '1xS_1xUT'?"], []),
        ("1xS 1xUT", ["did you mean '1xS_1xUT'?"], []),
        ("1xS__1xUT", ["empty entry", "doubled", "did you mean '1xS_1xUT'?"], []),
        ("1xs", ["unknown agent type code 's'", "Did you mean 'S'?", "Valid: AC"], []),
        ("x2S", ["the count comes before the 'x'", "did you mean '2xS'?"], []),
        ("2xFOO", ["unknown agent type code 'FOO'", "Valid: AC, AD"], ["Did you mean"]),
        ("3S", ["missing 'x': did you mean '3xS'?"], []),
        ("2S_1xUT", ["missing 'x': did you mean '2xS'?"], []),
        ("2XS", ["lower-case 'x'", "did you mean '2xS'?"], []),
        ("UT_DE", ["starts with its count", "did you mean '1xUT_1xDE'?"], []),
        ("2xUT@DQN", ["unknown learner 'DQN'", "Did you mean 'dqn'?"], []),
        ("2xTFT@dqn", ["static strategy", "did you mean '2xTFT'?"], []),
        ("1xS", ["has 1 agent", "at least 2", "e.g. '1xS_1xTFT'"], []),
        ("0xS", ["count must be at least 1"], ["did you mean"]),
    ],
)
def test_malformed_population_messages(text, expected, absent):
    with pytest.raises(PopulationSpecError) as err:
        parse_population(text)
    msg = str(err.value)
    for part in expected:
        assert part in msg, msg
    for part in absent:
        assert part not in msg, msg


def test_suggestions_always_parse():
    """Whatever is suggested as a whole population string is itself accepted."""
    import re

    for text in ["1x S_1xUT", "1xS 1xUT", "1xS__1xUT", "x2S", "3S", "2XS", "2*S", "S2_1xUT", "UT_DE", "1xS,1xUT",
                 ]:
        with pytest.raises(PopulationSpecError) as err:
            parse_population(text)
        m = re.search(r"did you mean '([^']+)'\?", str(err.value))
        assert m, str(err.value)
        assert parse_population(m.group(1)).size >= 2 or "would still be refused" in str(err.value)


def test_every_message_names_the_valid_codes_or_the_fix():
    for text in ["1x S", "1xS__1xUT", "x2S", "2xFOO", "1xs"]:
        with pytest.raises(PopulationSpecError) as err:
            parse_population(text)
        msg = str(err.value)
        assert "TFT" in msg and "mDE" in msg and all(c in msg for c in valid_codes()[:3]), msg


@pytest.mark.parametrize("text", ["1x S", "1xS__1xUT", "x2S"])
def test_cli_population_typos_exit_2_with_the_suggestion(tmp_path, text):
    out = tmp_path / "out"
    proc, _ = cli("--destination_folder", text, "--output", str(out))
    assert "did you mean" in refused(proc)
    assert not out.exists()


# -- 4. an output folder that cannot be created ----------------------------------------------------------------
def _output_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {"under a file": (a_file / "out", "Not a directory"), "a file": (a_file, "it is a file, not a folder")}
    if Path("/proc/self").exists():
        cases["under /proc"] = (Path("/proc/x/out"), "No such file or directory")
    return cases


@pytest.mark.parametrize("case", ["under a file", "a file", "under /proc"])
def test_cli_unwritable_output_is_refused_before_any_work(tmp_path, case):
    cases = _output_cases(tmp_path)
    if case not in cases:
        pytest.skip("no /proc here")
    path, reason = cases[case]
    proc, _ = cli("--destination_folder", "1xS_1xUT", "--num_iterations", "3", "--num_runs", "1",
                  "--output", str(path))
    err = refused(proc)
    assert f"cannot write the output folder {str(path)!r}" in err and reason in err


def test_check_output_creates_and_leaves_no_probe_file(tmp_path):
    from scenarios.cli import check_output

    out = tmp_path / "new" / "nested"
    check_output(out)
    assert out.is_dir() and list(out.iterdir()) == []


def test_threads_left_behind_do_not_block_exit():
    """check_reachable leaves no non-daemon thread running after a refusal (the CLI must exit at once)."""
    before = {t.ident for t in threading.enumerate()}
    srv, port = _silent_listener()
    try:
        with pytest.raises(ClusterError):
            check_reachable(f"127.0.0.1:{port}", timeout_s=1)
    finally:
        srv.close()
    extra = [t for t in threading.enumerate() if t.ident not in before and not t.daemon]
    assert not extra, extra


def test_llm_runs_on_the_cpu_stack_in_one_batch_and_elsewhere_spread_over_workers():
    from dataclasses import replace

    from actors.llm.config import LLMAgentConfig
    from scenarios.run import with_agents
    from simulator.resources import stack_workers

    classic = RunConfig("1xUT_1xaUT_1xDE", num_runs=3)
    llm = with_agents(RunConfig("1xUT@llm_1xaUT@llm_1xDE", num_runs=3), llm=LLMAgentConfig())
    gpu = with_agents(RunConfig("1xUT@llm_1xaUT@llm_1xDE", num_runs=3), llm=replace(LLMAgentConfig(), device="cuda"))
    assert stack_workers(classic, 2) == 2 and stack_workers(gpu, 2) == 2
    assert stack_workers(llm, 2) == 1 and batch_sizes(llm, 2, None) == {3: 1}  # one engine for the three runs
    assert batch_sizes(classic, 2, None) == {2: 1, 1: 1}


def test_an_llm_stack_on_cuda_asks_ray_for_a_whole_gpu_and_one_gpu_holds_what_memory_allows():
    from dataclasses import replace

    from actors.llm.budget import GiB, ModelShape, estimate, runs_per_device
    from actors.llm.config import LLMActors, LLMAgentConfig
    from scenarios.run import with_agents
    from simulator.resources import batch_resources

    pop = "1xDe@llm_1xTFT"
    cuda = replace(LLMAgentConfig(), device="cuda")
    assert batch_resources(RunConfig("1xUT_1xaUT_1xDE")) == {"num_cpus": 1.0}
    assert batch_resources(with_agents(RunConfig(pop), llm=LLMAgentConfig())) == {"num_cpus": 1.0}  # CPU
    assert batch_resources(with_agents(RunConfig(pop), llm=cuda)) == {"num_cpus": 1.0, "num_gpus": 1.0}
    actors = replace(cuda, actors=LLMActors(rollout_actors=1))  # the actors hold the GPUs, not the task
    assert batch_resources(with_agents(RunConfig(pop), llm=actors)) == {"num_cpus": 1.0}
    # Gemma-2-2B's shape: runs that fit an 80 GiB GPU, by the same estimate that refuses a population too big
    gemma = ModelShape(hidden=2304, intermediate=9216, layers=26, heads=8, kv_heads=4, head_dim=256, vocab=256000,
                       tied=True)
    bf16 = replace(cuda, dtype="bfloat16")
    n = runs_per_device(bf16, gemma, ["De"], 2, 80 * GiB)
    assert n >= 1
    assert sum(estimate(bf16, gemma, ["De"], 2, n).values()) <= 80 * GiB < sum(estimate(bf16, gemma, ["De"], 2, n + 1).values())
    assert runs_per_device(bf16, gemma, ["De"], 2, 1 * GiB) == 0  # the base weights alone do not fit


def test_the_job_command_sizes_gpu_stacks_by_the_memory_arithmetic(tiny_model_path):
    from dataclasses import replace

    from actors.llm.budget import GiB, ModelShape, runs_per_device
    from actors.llm.config import LLMActors, LLMAgentConfig
    from scenarios.cli import gpu_stacks
    from scenarios.run import Launch, with_agents

    llm = replace(LLMAgentConfig(), model=str(tiny_model_path), device="cuda", actors=LLMActors(gpu_memory_gib=0.05))
    cfg = with_agents(RunConfig("1xDe@llm_1xTFT", num_runs=100), llm=llm)
    expected = runs_per_device(llm, ModelShape.from_dir(tiny_model_path), ["De"], 2, int(0.05 * GiB))
    assert 1 < expected < 100
    assert gpu_stacks([cfg], Launch()).runs_per_batch == expected
    assert gpu_stacks([cfg], Launch(runs_per_batch=3)).runs_per_batch == 3  # the user's choice stands
    on_cpu = with_agents(RunConfig("1xDe@llm_1xTFT", num_runs=100), llm=replace(llm, device="cpu"))
    assert gpu_stacks([on_cpu], Launch()).runs_per_batch is None


def test_llm_stacks_on_this_cpu_run_one_after_the_other_in_process_and_classic_batches_on_ray():
    from actors.llm.config import LLMAgentConfig
    from scenarios.run import with_agents
    from simulator.driver import local_backend

    llm = with_agents(RunConfig("1xDe@llm_1xTFT", num_runs=3), llm=LLMAgentConfig())
    classic = RunConfig("1xUT_1xaUT_1xDE", num_runs=3)
    assert local_backend("ray", None, [llm, llm]) == "inline"  # two groups of a job: one after the other
    assert local_backend("ray", None, [classic, classic]) == "ray"
    assert local_backend("ray", None, [llm, classic]) == "ray"
    assert local_backend("ray", None, [classic]) == "inline"  # one batch: nothing to spread
    assert local_backend("ray", "10.0.0.5:6379", [llm, llm]) == "ray"  # a cluster places them itself
