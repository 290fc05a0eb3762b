"""FederatedTrainer: metrics, determinism, kill-and-resume, multi-process equivalence, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fed_setup import PoisonTask, assert_states_close, client_dataset, final_state, make_trainer, peft_model

from peft_fed.runtime.checkpoint import CorruptCheckpointError, list_checkpoints

REQUIRED_KEYS = {
    "round", "method", "clients", "train_loss", "eval_loss", "eval_accuracy", "basis_overlap", "uplink_bytes",
    "downlink_bytes", "local_train_seconds", "init_seconds", "aggregation_seconds", "eval_seconds",
    "client_loss_first", "client_loss_last",
}


@pytest.mark.parametrize("method", ["fedsmoothlora", "fedit", "subspace_reg", "frlora"])
def test_metrics_file_has_every_key(tmp_path, method):
    trainer = make_trainer(method, tmp_path)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert REQUIRED_KEYS <= row.keys()
        assert row["method"] == method
        assert set(row["client_loss_first"]) == set(row["clients"]) == set(row["client_loss_last"])
        assert row["uplink_bytes"] > 0 and 0.0 <= row["basis_overlap"] <= 1.0 + 1e-6
        assert row["eval_loss"] is not None and 0.0 <= row["eval_accuracy"] <= 1.0


def test_runs_are_deterministic(tmp_path):
    a = make_trainer("fedsmoothlora", tmp_path / "a")
    a.train()
    b = make_trainer("fedsmoothlora", tmp_path / "b")
    b.train()
    assert_states_close(final_state(a), final_state(b))


@pytest.mark.parametrize("method", ["fedsmoothlora", "fedsa_lora"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, method):
    full = make_trainer(method, tmp_path / "full", num_rounds=3, save_every=1)
    full.train()
    # "killed" after round 2: run 2 rounds, then a new process resumes for the third
    part = make_trainer(method, tmp_path / "part", num_rounds=3, save_every=1)
    part.args.num_rounds = 2
    part.train()
    resumed = make_trainer(method, tmp_path / "part", num_rounds=3, save_every=1, resume=True)
    assert resumed.start_round == 2
    resumed.train()
    assert_states_close(final_state(full), final_state(resumed))
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]


def test_corrupt_checkpoint_is_refused(tmp_path):
    trainer = make_trainer("fedit", tmp_path, save_every=1)
    trainer.train()
    last = list_checkpoints(tmp_path)[-1]
    with open(last / "server.safetensors", "r+b") as handle:
        handle.seek(-3, os.SEEK_END)
        handle.write(b"xyz")
    with pytest.raises(CorruptCheckpointError, match="does not match its manifest"):
        make_trainer("fedit", tmp_path, save_every=1, resume=True)
    (last / "manifest.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="no manifest"):
        make_trainer("fedit", tmp_path, save_every=1, resume=True)


def test_nan_client_is_dropped_and_round_completes(tmp_path):
    clients = [client_dataset(0), client_dataset(1, poison=True), client_dataset(2)]
    for method in ("fedit", "fedsmoothlora"):
        trainer = make_trainer(method, tmp_path / method, clients=clients, clients_per_round=3, task=PoisonTask())
        history = trainer.train()
        for row in history:
            assert set(row["dropped_clients"]) == {"1"}
            assert row["eval_loss"] is not None and row["eval_loss"] == row["eval_loss"]  # finite global model
        # the poisoned client's state was never updated
        assert trainer.client_states["1"].last_round is None
        assert all(trainer.client_states[c].last_round == 1 for c in ("0", "2"))


def test_more_clients_per_round_than_clients(tmp_path):
    with pytest.raises(ValueError, match="clients_per_round=9 is more than the 4 clients"):
        make_trainer("fedit", tmp_path, clients_per_round=9)


def test_client_without_samples(tmp_path):
    clients = [client_dataset(0), client_dataset(1).select([])]
    with pytest.raises(ValueError, match=r"client\(s\) \[1\] have no training samples"):
        make_trainer("fedit", tmp_path, clients=clients)


def test_client_smaller_than_a_batch_trains(tmp_path):
    clients = [client_dataset(0, n=2), client_dataset(1, n=3)]
    history = make_trainer("fedsmoothlora", tmp_path, clients=clients, per_device_train_batch_size=8).train()
    assert all(row["dropped_clients"] == {} for row in history)


def test_method_mismatch_with_peft_config(tmp_path):
    with pytest.raises(ValueError, match="PEFT config is for 'fedsmoothlora'"):
        make_trainer("fedit", tmp_path, model=peft_model("fedsmoothlora"))


def test_peft_config_hyperparameters_reach_the_strategy(tmp_path):
    model = peft_model("subspace_reg")
    model.peft_config["default"].mu = 0.5
    trainer = make_trainer("subspace_reg", tmp_path, model=model, method_kwargs={"beta": 0.2})
    assert trainer.strategy.hyperparameters.mu == 0.5 and trainer.strategy.hyperparameters.beta == 0.2


def test_memory_of_many_clients_is_adapter_state(tmp_path):
    """50 simulated clients are adapter states on one model, not 50 models."""
    import gc

    from transformers import BertForSequenceClassification

    clients = [client_dataset(i, n=4) for i in range(50)]
    trainer = make_trainer("fedsmoothlora", tmp_path, clients=clients, clients_per_round=50, num_rounds=1,
                           local_steps=1, eval_every=0, num_gradient_batches=1)
    trainer.train()
    assert all(state.last_round == 0 for state in trainer.client_states.values())
    gc.collect()  # earlier tests' trainers are unreachable cycles (trainer <-> its engine) until collected
    models = [o for o in gc.get_objects() if isinstance(o, BertForSequenceClassification)]
    assert len(models) == 1  # the one backbone every client shares
    model_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    adapter_bytes = sum(4 * s.rank * (s.out_features + s.in_features) for s in trainer.specs.values())
    client_bytes = sum(state.nbytes for state in trainer.client_states.values())
    assert client_bytes == 50 * adapter_bytes  # FedSmoothLoRA keeps one rank-r upload per client
    assert client_bytes < 0.05 * 50 * model_bytes


def _run_two_processes(out: Path, *arguments: str) -> None:
    """``fed_setup.py`` under two real processes (``torch.distributed.run``, gloo on 127.0.0.1). ``accelerate launch
    --cpu --num_processes 2`` starts a single process on a machine without GPUs, so it cannot be the launcher here."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).with_name("fed_setup.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(script), *arguments[:1], str(out), *arguments[1:]]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "history-0.json").is_file() and (out / "history-1.json").is_file()  # two processes did run


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """One FedSmoothLoRA run of ``fed_setup.py`` on two real processes, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("two_processes") / "two"
    _run_two_processes(out, "fedsmoothlora")
    return out


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, two_process_run):
    """Client-parallel training on two real processes ends where one process does. A process that trained its
    clients on a shard of their batches (Accelerate's data-loader sharding left on) ends 0.035 away and fails."""
    script = Path(__file__).with_name("fed_setup.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), "fedsmoothlora", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    one = torch.load(tmp_path / "one" / "final_state.pt")
    two = torch.load(two_process_run / "final_state.pt")
    assert_states_close(one, two, atol=1e-6)


@pytest.mark.slow
def test_trained_factors_go_to_the_main_process_only(two_process_run):
    """Two real processes (torch.distributed.run, gloo): every process aggregates the same rounds from the gathered
    uploads, but the clients' full trained factors, which only the round's diagnostics read, reach the main process
    alone; its rows (metrics.jsonl) have the diagnostics, the other process's rows have none and are otherwise equal."""
    main, other = (json.loads((two_process_run / f"history-{rank}.json").read_text()) for rank in (0, 1))
    diagnostics = ("basis_overlap", "cancellation_ratio", "pairwise_cosine", "whole_model_pairwise_cosine")
    assert len(main) == len(other) == 2
    for row_main, row_other in zip(main, other, strict=True):
        assert all(isinstance(row_main[key], float) for key in diagnostics)  # every client's trained factors
        assert not any(key in row_other for key in diagnostics)  # none of them
        timing = ("seconds", "timings")
        same = {k for k in row_other if not any(t in k for t in timing)}
        assert {k: row_other[k] for k in same} == {k: row_main[k] for k in same}
    rows = [json.loads(x) for x in (two_process_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["basis_overlap"] for row in rows] == [row["basis_overlap"] for row in main]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """A real kill (SIGKILL, at whatever point the run is) and a resume from the last checkpoint."""
    import signal
    import time

    script = Path(__file__).with_name("fed_setup.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    common = ["fedsmoothlora", "--num_rounds", "4", "--save_every", "1"]
    subprocess.run([sys.executable, str(script), common[0], str(tmp_path / "full"), *common[1:]], check=True,
                   env=env, capture_output=True)
    victim = subprocess.Popen([sys.executable, str(script), common[0], str(tmp_path / "killed"), *common[1:]],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoints" / "round-000002").exists():
        assert victim.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "final_state.pt").exists()
    subprocess.run([sys.executable, str(script), common[0], str(tmp_path / "killed"), *common[1:], "--resume"],
                   check=True, env=env, capture_output=True)
    assert_states_close(torch.load(tmp_path / "full" / "final_state.pt"), torch.load(tmp_path / "killed" / "final_state.pt"))
    rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
