"""A real Flower deployment on loopback: a SuperLink and two SuperNodes as processes, TLS and SuperNode
authentication on, started and stopped by the test (every process in its own group, killed at the end).

* FedSmoothLoRA, 2 rounds: the server's final state equals the simulation's (same seed, partition, sampling);
* FedIT, 2 rounds, one SuperNode killed while it serves round 2: the run finishes, the lost client is in the
  metrics, and the final state equals a simulation that drops that client's update in round 2;
* FedIT under secure aggregation (Flower's SecAgg+): the aggregate within SecAgg+'s quantisation error;
* a SuperNode whose key was never registered is refused by the SuperLink.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("flwr")

from deployment_setup import assert_same_result, deployed_result, simulate, small_settings  # noqa: E402
from tiny_models import save_stand_in  # noqa: E402

from peft_fed.flower.local import LocalDeployment  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "examples" / "flower_app"
RUN_TIMEOUT = 420


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return save_stand_in("roberta", tmp_path_factory.mktemp("stand-in"))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    with LocalDeployment(tmp_path_factory.mktemp("deployment"), num_nodes=2, tls=True, node_auth=True) as running:
        yield running
    for name, process in running.processes.items():  # pragma: no cover - stop() empties it
        raise AssertionError(f"{name} (pid {process.pid}) was left running")


def _run_config(folder: Path, settings: dict, **deployment_settings) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return {"config": str(path), "node_wait": 120, **deployment_settings}


@pytest.mark.slow
def test_fedsmoothlora_over_tls_equals_the_simulation(deployment, model, tmp_path):
    settings = small_settings(model, "fedsmoothlora", tmp_path / "deployed")
    run_id = deployment.run(APP, _run_config(tmp_path, settings), timeout=RUN_TIMEOUT)
    assert "completed" in deployment.status(run_id)
    deployed = deployed_result(tmp_path / "deployed")
    assert_same_result(deployed, simulate({**settings, "output_dir": str(tmp_path / "sim")}))
    assert (tmp_path / "deployed" / "final" / "adapter_model.safetensors").is_file()
    assert "fedsmoothlora" in (tmp_path / "deployed" / "final" / "README.md").read_text()


@pytest.mark.slow
def test_fedit_survives_a_node_killed_mid_round(deployment, model, tmp_path):
    settings = small_settings(model, "fedit", tmp_path / "deployed")
    run_id = deployment.submit(APP, _run_config(tmp_path, settings, round_timeout=90, round_retries=0))
    # node 1 has answered its query and round 1 when its second train message arrives: kill it while it trains
    previous = deployment.folder / "logs" / "supernode-1.log"
    already = previous.read_text(errors="replace").count("Receiving: train message")
    deployment.wait_for_log("supernode-1", "Receiving: train message", count=already + 2, timeout=RUN_TIMEOUT)
    deployment.kill_node(1)
    status = deployment.wait(run_id, RUN_TIMEOUT)
    assert "completed" in status, deployment.logs(run_id)[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "deployed" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["dropped_clients"] == {} and list(rows[1]["dropped_clients"]) == ["1"]
    assert "sent no reply within 90 s" in rows[1]["dropped_clients"]["1"]
    simulated = simulate({**settings, "output_dir": str(tmp_path / "sim")}, drop={(1, "1")})
    assert_same_result(deployed_result(tmp_path / "deployed"), simulated)
    deployment.start_node(1)  # back for the tests after this one


@pytest.mark.slow
def test_secure_aggregation_gives_the_aggregate_within_the_quantisation_error(deployment, model, tmp_path):
    # FedIT under Flower's SecAgg+ (4 message exchanges per node and round): the server learns only the mean
    settings = small_settings(model, "fedit", tmp_path / "deployed", num_rounds=1)
    run_id = deployment.run(APP, _run_config(tmp_path, settings, secure_aggregation=True), timeout=RUN_TIMEOUT)
    assert "completed" in deployment.status(run_id)
    step = 2 * 8.0 / 2**22  # SecAgg+'s quantisation step at the default clipping and quantisation ranges
    simulated = simulate({**settings, "output_dir": str(tmp_path / "sim")})
    assert_same_result(deployed_result(tmp_path / "deployed"), simulated, atol=2 * step)


@pytest.mark.slow
def test_an_unregistered_node_key_is_refused(deployment, tmp_path):
    deployment.node_configs[2] = {"partition-id": 0, "state-dir": str(tmp_path / "intruder")}
    intruder = deployment.start_node(2, register=False)  # a key of its own, never registered with the SuperLink
    try:
        intruder.wait(timeout=90)
        text = (deployment.folder / "logs" / "supernode-2.log").read_text(errors="replace")
        assert intruder.returncode != 0 and "Failed to activate SuperNode" in text, text[-2000:]
        assert "SuperNode ID:" not in text
        # the registered nodes of the same SuperLink were admitted
        assert "SuperNode ID:" in (deployment.folder / "logs" / "supernode-0.log").read_text(errors="replace")
    finally:
        deployment.kill_node(2)
