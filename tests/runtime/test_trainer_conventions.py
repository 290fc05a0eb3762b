"""FederatedTrainer keeps transformers.Trainer's conventions: one run-level step for report_to,
``train(resume_from_checkpoint=...)``, ``save_total_limit``, and no silent override of a user's settings."""

from __future__ import annotations

import json
import shutil

import pytest
from fed_setup import assert_states_close, final_state, make_trainer
from transformers import TrainerCallback

from peft_fed.runtime.checkpoint import list_checkpoints


class LogRecorder(TrainerCallback):
    """What a report_to integration (TensorBoard, W&B) receives."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs or {})))


def test_report_to_gets_one_log_per_round_at_increasing_steps(tmp_path):
    recorder = LogRecorder()
    trainer = make_trainer("fedsmoothlora", tmp_path, num_rounds=3, eval_every=2, callbacks=[recorder])
    trainer.train()
    # neither each client's Trainer.train() nor the round's evaluation logs on its own
    assert [step for step, _ in recorder.logs] == [1, 2, 3]
    for step, logs in recorder.logs:
        assert logs["round"] == step and "train_loss" in logs and "basis_overlap" in logs
    assert "eval_loss" in recorder.logs[1][1] and "eval_loss" not in recorder.logs[0][1]  # None is not logged
    assert [entry["step"] for entry in trainer.state.log_history] == [1, 2, 3]


def test_train_resume_from_checkpoint(tmp_path):
    full = make_trainer("fedsmoothlora", tmp_path / "full", num_rounds=3, save_every=1)
    full.train()
    part = make_trainer("fedsmoothlora", tmp_path / "part", num_rounds=3, save_every=1)
    part.args.num_rounds = 2
    part.train()
    for how in ("path", True):
        resumed = make_trainer("fedsmoothlora", tmp_path / "part", num_rounds=3, save_every=1)
        assert resumed.start_round == 0  # args.resume is off: only the train() argument resumes
        target = str(list_checkpoints(tmp_path / "part")[1]) if how == "path" else True
        resumed.train(resume_from_checkpoint=target)
        assert resumed.history[-1]["round"] == 3
        assert_states_close(final_state(full), final_state(resumed))
        rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2, 3]
        # the next pass resumes from round 2 again
        for extra in list_checkpoints(tmp_path / "part")[2:]:
            shutil.rmtree(extra)


def test_resume_from_a_missing_checkpoint_is_an_error(tmp_path):
    trainer = make_trainer("fedit", tmp_path, num_rounds=1)
    with pytest.raises(ValueError, match="no federated checkpoint"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoints" / "round-000009"))


def test_save_total_limit_keeps_the_last_checkpoints(tmp_path):
    trainer = make_trainer("fedit", tmp_path, num_rounds=3, save_every=1, save_total_limit=2, eval_every=0)
    trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-000002", "round-000003"]


def test_per_step_settings_are_not_overridden_silently(tmp_path):
    with pytest.warns(UserWarning, match="eval_strategy='steps' cannot apply.*eval_every"):
        make_trainer("fedit", tmp_path, eval_strategy="steps", eval_steps=1)


def test_disable_tqdm_is_honoured(tmp_path, capsys):
    trainer = make_trainer("fedit", tmp_path, num_rounds=1, disable_tqdm=True)
    assert trainer.args.disable_tqdm is True
    trainer.train()
    assert "rounds" not in capsys.readouterr().err
