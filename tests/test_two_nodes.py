"""Two Ray nodes on this machine (ray.cluster_utils.Cluster): LLM actors placed on both, one dataset from tasks on
both, and the output check that refuses a folder the nodes do not share."""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path

import pytest

from actors.llm.agent import LLMAgentConfig, group_engine
from actors.llm.config import LLMActors, PPOConfig
from actors.llm.remote import launch, learner_group_factory
from simulator.errors import ClusterError
from tests.helpers import need, read_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL_PPO = PPOConfig(batch_size=2, mini_batch_size=2, gradient_accumulation_steps=1, lora_r=8)


@pytest.fixture(scope="module")
def two_nodes():
    ray = need("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray, cluster
    ray.shutdown()
    cluster.shutdown()


def test_llm_actors_spread_over_both_nodes(two_nodes, tiny_model_path):
    ray, _ = two_nodes
    from transformers import AutoTokenizer

    config = LLMAgentConfig(model=str(tiny_model_path), ppo=SMALL_PPO)
    cluster = launch(LLMActors(rollout_actors=1, learner_actors=1, placement="STRICT_SPREAD"), ["n0"],
                     [("n0", SMALL_PPO)], lambda names: partial(group_engine, config, tiny_model_path, 0, len(names)),
                     learner_group_factory(str(tiny_model_path), "cpu"), AutoTokenizer.from_pretrained(tiny_model_path))
    try:
        nodes = {info["node_id"] for info in cluster.info}
        assert len(nodes) == 2  # the rollout actor on one node, the learner on the other
        assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        (weights,) = cluster.learners.export(["n0"])
        cluster.engine.load_adapter(weights)  # the adapter crosses nodes through the object store
        prompt = [1, 2, 3, 4]
        assert len(cluster.engine.score("n0", prompt, [5, 6])) == 2
    finally:
        cluster.close()


def test_tasks_on_both_nodes_write_one_dataset(two_nodes, tmp_path):
    _, cluster = two_nodes
    from scenarios.factory import build_groups
    from simulator.config import RunConfig
    from simulator.driver import run_sweep

    cfg = RunConfig("1xUT_1xaUT_1xDE", num_iterations=200, num_runs=4, seed=2, output=tmp_path)
    run_sweep(cfg, build_groups, backend="ray", ray_address=cluster.address,
              runs_per_batch=1, show_progress=False)
    df = read_dataset(cfg.dataset_dir)
    assert sorted(df["run"].unique().to_list()) == [0, 1, 2, 3] and df.height == 4 * 200 * 3


def _probe_with_own_disk(output: str, token: str) -> str:
    """A node whose disk is its own: it writes its probe to a path the driver does not read (as a node with a
    local ./results would)."""
    import ray

    from simulator.cluster import _write_probe

    node = ray.get_runtime_context().get_node_id()
    if node != os.environ.get("MORALSIM_TEST_DRIVER_NODE"):
        output = output + "-on-its-own-disk"
    return _write_probe(output, token)


def test_an_output_the_nodes_do_not_share_is_refused(two_nodes, tmp_path, monkeypatch):
    ray, _ = two_nodes
    from simulator.cluster import check_shared_output

    assert len(check_shared_output(tmp_path)) == 2  # this machine's nodes share its disk
    driver_node = ray.get_runtime_context().get_node_id()

    def probe(output: str, token: str) -> str:
        os.environ["MORALSIM_TEST_DRIVER_NODE"] = driver_node
        return _probe_with_own_disk(output, token)

    with pytest.raises(ClusterError, match="is not shared: 1 of 2 Ray nodes"):
        check_shared_output(tmp_path, probe=probe)


def test_tasks_on_both_nodes_write_one_dataset_to_s3(two_nodes, s3_uri, tmp_path):
    """--output as an s3:// URI: every node passes the output check, and the runs of tasks on both nodes land in
    the one dataset in the bucket, equal to the same runs written to a shared folder."""
    _, cluster = two_nodes
    from analysis.dataset import local_copy
    from scenarios.factory import build_groups
    from simulator.cluster import check_shared_output
    from simulator.config import RunConfig
    from simulator.driver import run_sweep

    uri = s3_uri("two-nodes")
    assert len(check_shared_output(uri)) == 2
    frames = []
    for output in (uri, tmp_path / "shared"):
        cfg = RunConfig("1xUT_1xaUT_1xDE", num_iterations=200, num_runs=4, seed=2, output=output)
        run_sweep(cfg, build_groups, backend="ray", ray_address=cluster.address,
                  runs_per_batch=1, show_progress=False)
        frames.append(read_dataset(local_copy(cfg.dataset_location, tmp_path / "cache")))
    assert sorted(frames[0]["run"].unique().to_list()) == [0, 1, 2, 3] and frames[0].height == 4 * 200 * 3
    from polars.testing import assert_frame_equal

    assert_frame_equal(frames[0], frames[1])


def test_a_node_that_cannot_write_the_s3_output_is_refused(two_nodes, s3_uri):
    ray, _ = two_nodes
    from simulator.cluster import _write_probe, check_shared_output

    driver_node = ray.get_runtime_context().get_node_id()
    uri = s3_uri("no-route")

    def probe(output: str, token: str) -> str:  # the other node has no route to the endpoint
        if ray.get_runtime_context().get_node_id() != driver_node:
            output = re.sub(r"endpoint_override=127\.0\.0\.1:\d+", "endpoint_override=127.0.0.1:1", output)
        return _write_probe(output, token)

    with pytest.raises(ClusterError, match=r"1 of 2 Ray nodes cannot write there \(node .*NETWORK_CONNECTION") as e:
        check_shared_output(uri, probe=probe)
    assert "test:test@" not in str(e.value)
