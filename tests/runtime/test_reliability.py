"""Run folders and resumes that cannot silently destroy, mix or misread runs; damage a crash leaves is repaired.

Each test reproduces one finding of the reliability issue (reused output folder, unchecked resume settings,
leftovers of a killed write) on the tiny model of ``fed_setup.py``; the last one runs the real command line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fed_setup import assert_states_close, client_dataset, final_state, make_trainer, peft_model

from peft_fed.runtime import checkpoint as ckpt
from peft_fed.runtime.checkpoint import (
    OutputDirInUseError,
    ResumeMismatchError,
    list_checkpoints,
    load_checkpoint,
)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _rounds(folder: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _leftovers(folder: Path) -> list[str]:
    names = [p.name for p in (folder / "checkpoints").iterdir()] if (folder / "checkpoints").is_dir() else []
    names += [p.name for p in folder.iterdir()]
    return sorted(n for n in names if n.startswith("."))


# ------------------------------------------------------------------ 1. a reused output folder


def test_new_run_into_a_folder_holding_a_run_is_refused(tmp_path):
    make_trainer("fedit", tmp_path, num_rounds=3, save_every=1).train()
    before = _snapshot(tmp_path)
    second = make_trainer("fedit", tmp_path, num_rounds=2, save_every=1, seed=7, learning_rate=0.05)
    with pytest.raises(OutputDirInUseError) as error:
        second.train()
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "metrics.jsonl" in message and "checkpoints/round-000003" in message
    assert "--resume" in message and "--overwrite_output_dir" in message
    assert _snapshot(tmp_path) == before  # nothing written, nothing deleted


def test_overwrite_output_dir_replaces_the_old_run(tmp_path):
    make_trainer("fedit", tmp_path, num_rounds=3, save_every=1).train()
    (tmp_path / "final").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    make_trainer("fedit", tmp_path, num_rounds=2, save_every=1, seed=7, overwrite_output_dir=True).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-000001", "round-000002"]
    assert _rounds(tmp_path) == [1, 2]
    assert not (tmp_path / "final").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    record = json.loads((tmp_path / "run_fingerprint.json").read_text())
    assert record["fingerprint"]["seed"] == 7


def test_run_folder_and_checkpoints_record_what_made_the_run(tmp_path):
    make_trainer("fedsmoothlora", tmp_path, num_rounds=1, save_every=1, method_kwargs={"zeta": 0.5}).train()
    record = json.loads((tmp_path / "run_fingerprint.json").read_text())
    meta = load_checkpoint(list_checkpoints(tmp_path)[-1]).meta
    for document in (record, meta):
        fingerprint = document["fingerprint"]
        assert fingerprint["method"] == "fedsmoothlora" and fingerprint["zeta"] == 0.5 and "gamma" in fingerprint
        assert (fingerprint["seed"], fingerprint["learning_rate"], fingerprint["clients_per_round"]) == (42, 0.01, 2)
        assert fingerprint["local_steps"] == 2 and fingerprint["per_device_train_batch_size"] == 4
        assert fingerprint["adapted_layers"].startswith("4 layers, rank 4")
        assert len(fingerprint["client_data"]) == 4 and fingerprint["initial_weights"]
        assert document["settings"]["num_rounds"] == 1 and "num_rounds" not in fingerprint
        assert {"peft", "transformers", "torch", "peft_fed"} <= set(document["versions"])


def test_a_run_that_fails_at_once_changes_nothing(tmp_path):
    make_trainer("fedit", tmp_path, num_rounds=2, save_every=1).train()
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="clients_per_round=9"):
        make_trainer("fedit", tmp_path, clients_per_round=9, overwrite_output_dir=True)
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True])
def test_pipeline_rerun_that_fails_changes_nothing(tmp_path, overwrite):
    """A rerun that stops (folder refused, or a bad value found once the model is built) leaves the old run whole."""
    from peft_fed.runtime.pipeline import run_federated

    (tmp_path / "checkpoints" / "round-000001").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')
    (tmp_path / "run_config.json").write_text('{"seed": 1}')
    before = _snapshot(tmp_path)
    settings = dict(method="fedit", num_clients=4, clients_per_round=9, local_steps=1, max_train_samples=32,
                    max_eval_samples=8, max_length=16, output_dir=str(tmp_path))  # fmt: skip
    if overwrite:
        with pytest.raises(ValueError, match="clients_per_round=9 is more than the 4 clients"):
            run_federated(**settings, overwrite_output_dir=True)
    else:
        with pytest.raises(OutputDirInUseError, match="already holds a run"):
            run_federated(**settings)
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------ 2. resume checks every result-changing setting


def _checkpointed(tmp_path, method="fedit", **overrides):
    settings = dict(num_rounds=2, save_every=1)
    settings.update(overrides)
    make_trainer(method, tmp_path, **settings).train()
    return tmp_path


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(seed=7), "seed: 42 -> 7"),
        (dict(learning_rate=0.05), "learning_rate: 0.01 -> 0.05"),
        (dict(clients_per_round=3), "clients_per_round: 2 -> 3"),
        (dict(local_steps=3), "local_steps: 2 -> 3"),
        # built in the test (a model made at collection would outlive it and count in other tests' memory checks)
        (dict(clients=lambda: [client_dataset(i + 10) for i in range(4)]), "client_data: "),  # another partition
        (dict(model=lambda: peft_model("fedit", seed=1)), "initial_weights: "),  # another model
        (dict(model=lambda: peft_model("fedit", r=8)), "adapted_layers: \"4 layers, rank 4"),  # another r
    ],
    ids=["seed", "learning_rate", "clients_per_round", "local_steps", "partition", "model", "r"],
)
def test_resume_with_a_result_changing_setting_is_refused(tmp_path, change, expected):
    _checkpointed(tmp_path)
    before = _snapshot(tmp_path)
    settings = dict(num_rounds=3, save_every=1, resume=True)
    settings.update({k: v() if callable(v) else v for k, v in change.items()})
    with pytest.raises(ResumeMismatchError) as error:
        make_trainer("fedit", tmp_path, **settings)
    message = str(error.value)
    assert "\n" not in message and "round-000002" in message and expected in message, message
    assert _snapshot(tmp_path) == before


def test_resume_through_train_argument_is_checked_too(tmp_path):
    _checkpointed(tmp_path)
    trainer = make_trainer("fedit", tmp_path, num_rounds=3, seed=7)
    with pytest.raises(ResumeMismatchError, match="seed: 42 -> 7"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_may_change_what_does_not_change_the_result(tmp_path):
    full = make_trainer("fedit", tmp_path / "full", num_rounds=4, save_every=1)
    full.train()
    _checkpointed(tmp_path / "part")
    resumed = make_trainer("fedit", tmp_path / "part", num_rounds=4, save_every=2, eval_every=2, save_total_limit=3,
                           resume=True)  # fmt: skip
    assert resumed.start_round == 2
    resumed.train()
    assert_states_close(final_state(full), final_state(resumed))
    record = json.loads((tmp_path / "part" / "run_fingerprint.json").read_text())
    changed = record["resumes"][-1]["changed"]
    assert record["resumes"][-1]["at_round"] == 2 and record["settings"]["num_rounds"] == 4
    assert any(c.startswith("num_rounds: 2 -> 4") for c in changed) and any(c.startswith("eval_every") for c in changed)
    assert _rounds(tmp_path / "part") == [1, 2, 3, 4]


def test_resume_cannot_shorten_a_run(tmp_path):
    _checkpointed(tmp_path, num_rounds=3)
    with pytest.raises(ResumeMismatchError, match=r"3 completed rounds but num_rounds=2.*round-000002"):
        make_trainer("fedit", tmp_path, num_rounds=2, save_every=1, resume=True)


def test_num_rounds_is_fixed_when_a_schedule_follows_the_run_length(tmp_path):
    _checkpointed(tmp_path, round_lr_scheduler="cosine")
    with pytest.raises(ResumeMismatchError, match=r"num_rounds: 2 -> 3 \(round_lr_scheduler='cosine' follows"):
        make_trainer("fedit", tmp_path, num_rounds=3, save_every=1, round_lr_scheduler="cosine", resume=True)


def _make_legacy(checkpoint: Path) -> None:
    """Rewrite a checkpoint as one from before run fingerprints (no fingerprint, settings, versions)."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    for key in ("fingerprint", "settings", "versions"):
        meta.pop(key, None)
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["meta.json"] = {"sha256": ckpt._sha256(checkpoint / "meta.json"), "bytes": (checkpoint / "meta.json").stat().st_size}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_checkpoint_without_fingerprint_resumes_with_a_warning(tmp_path, caplog):
    _checkpointed(tmp_path)
    _make_legacy(list_checkpoints(tmp_path)[-1])
    (tmp_path / "run_fingerprint.json").unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="peft_fed"):
        resumed = make_trainer("fedit", tmp_path, num_rounds=3, save_every=1, resume=True)
    assert resumed.start_round == 2 and "cannot be checked" in caplog.text
    resumed.train()
    assert _rounds(tmp_path) == [1, 2, 3]


def test_checkpoint_of_another_shape_is_refused_naming_it(tmp_path):
    _checkpointed(tmp_path)
    last = list_checkpoints(tmp_path)[-1]
    _make_legacy(last)  # no fingerprint: only the structural check can see it
    (tmp_path / "run_fingerprint.json").unlink(missing_ok=True)
    with pytest.raises(ResumeMismatchError) as error:
        make_trainer("fedit", tmp_path, num_rounds=3, resume=True, model=peft_model("fedit", r=8))
    message = str(error.value)
    assert "\n" not in message and str(last) in message and "does not fit this model" in message
    assert "factor 'bert.encoder.layer.0.attention.self.query.A' is (4, 32) in the checkpoint, (8, 32) here" in message


# ------------------------------------------------------------------ 5. damage that outlives a crash


def test_partial_last_metrics_line_is_rebuilt_from_the_checkpoint(tmp_path):
    _checkpointed(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 3, "method": "fedit", "train_lo')  # a kill mid-append
    resumed = make_trainer("fedit", tmp_path, num_rounds=3, save_every=1, resume=True)
    resumed.train()
    assert _rounds(tmp_path) == [1, 2, 3]


def test_stale_temporary_folders_are_removed(tmp_path):
    _checkpointed(tmp_path)
    pid = _dead_pid()
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "round-000001", root / f".tmp-round-000003-{pid}")
    shutil.copytree(root / "round-000001", root / f".del-round-000000-{pid}")
    (tmp_path / f".metrics.jsonl.tmp-{pid}").write_text('{"round"')
    resumed = make_trainer("fedit", tmp_path, num_rounds=3, save_every=1, resume=True)
    resumed.train()
    assert _leftovers(tmp_path) == []
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-000001", "round-000002", "round-000003"]


def test_stale_temporary_folders_are_removed_when_saving(tmp_path):
    pid = _dead_pid()
    (tmp_path / "checkpoints" / f".tmp-round-000001-{pid}").mkdir(parents=True)
    trainer = make_trainer("fedit", tmp_path / "other", num_rounds=1)
    trainer.train()
    ckpt.save_checkpoint(tmp_path, 1, trainer.server_state, trainer.client_states, trainer.original_weights, {})
    assert _leftovers(tmp_path) == []


def test_resave_killed_between_renames_keeps_a_valid_copy(tmp_path, monkeypatch):
    trainer = make_trainer("fedit", tmp_path, num_rounds=2, save_every=1)
    trainer.train()
    target = list_checkpoints(tmp_path)[-1]
    replace = os.replace
    calls = []

    def killed_after_first_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old copy has moved, the new one is not in yet: the process dies here
            raise KeyboardInterrupt("killed")
        return replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_after_first_rename)
    monkeypatch.setattr(ckpt, "_pid_alive", lambda pid: False)  # as seen by the next process
    with pytest.raises(KeyboardInterrupt):
        trainer.save_federated_checkpoint(2)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    # the next process finds round 2 whole (its old copy put back) and no leftovers
    resumed = make_trainer("fedit", tmp_path, num_rounds=3, save_every=1, resume=True)
    assert resumed.start_round == 2 and target.is_dir()
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------ the command line, on the real small model


F = ("--method fedit --num_clients 4 --clients_per_round 2 --local_steps 1 --per_device_train_batch_size 2 "
     "--max_length 16 --max_train_samples 64 --max_eval_samples 8").split()  # fmt: skip


def _peft_fed(*argv: str) -> subprocess.CompletedProcess:
    command = [shutil.which("peft-fed")] if shutil.which("peft-fed") else [sys.executable, "-m", "peft_fed.cli"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*command, *argv], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_cli_rerun_into_a_used_folder_is_refused_and_the_run_kept(tmp_path):
    started = time.perf_counter()
    out = str(tmp_path / "X")
    first = _peft_fed("train", *F, "--num_rounds", "2", "--save_every", "1", "--output_dir", out)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(tmp_path / "X")
    assert {"metrics.jsonl", "run_config.json", "run_fingerprint.json", "checkpoints/round-000002/meta.json"} <= set(before)
    again = _peft_fed("train", *F, "--num_rounds", "3", "--save_every", "1", "--seed", "7", "--learning_rate", "0.01",
                      "--output_dir", out)  # fmt: skip
    assert again.returncode != 0
    last_line = again.stderr.strip().splitlines()[-1]
    assert "already holds a run" in last_line and out in last_line and "--overwrite_output_dir" in last_line
    resumed = _peft_fed("train", *F, "--num_rounds", "3", "--save_every", "1", "--seed", "7", "--learning_rate",
                        "0.01", "--output_dir", out, "--resume")  # fmt: skip
    assert resumed.returncode != 0
    last_line = resumed.stderr.strip().splitlines()[-1]
    assert "seed: 42 -> 7" in last_line and "learning_rate: 0.001 -> 0.01" in last_line and "round-000002" in last_line
    assert _snapshot(tmp_path / "X") == before  # neither refused run wrote or deleted anything
    assert time.perf_counter() - started < 120


def test_a_second_train_call_continues_its_own_run(tmp_path):
    """Not a refused rerun: the same trainer training further into the folder it prepared (regression guard)."""
    trainer = make_trainer("fedit", tmp_path, num_rounds=2, save_every=1)
    trainer.train()
    trainer.args.num_rounds = 3
    trainer.train()
    assert _rounds(tmp_path) == [1, 2, 3] and len(trainer.history) == 3
