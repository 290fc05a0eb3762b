"""Client-level DP through FederatedTrainer (tiny random BERT): the metrics rows, the refusals, the model card."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "runtime"))
from fed_setup import make_trainer  # noqa: E402

from peft_fed.export.model_card import PRIVACY_KEY, _card_text  # noqa: E402
from peft_fed.export.report import ExportReport, FederatedRunInfo  # noqa: E402
from peft_fed.privacy import ClientLevelDPUnsupportedError, epsilon_after, model_card_facts  # noqa: E402

DP_KEYS = ("dp_epsilon", "dp_delta", "dp_noise_multiplier", "dp_clip", "dp_clipped_clients")


def test_a_dp_run_writes_the_dp_metrics_of_every_round_and_its_guarantee(tmp_path):
    trainer = make_trainer(
        "ffa_lora", tmp_path, num_clients=6, clients_per_round=3, num_rounds=2, dp_clip=0.01, dp_noise_multiplier=1.5,
        eval_every=0,
    )  # fmt: skip
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    delta = 6**-1.1
    for row in rows:
        assert all(key in row for key in DP_KEYS)
        assert row["dp_epsilon"] == pytest.approx(epsilon_after(6, 3, 1.5, row["round"], delta), rel=1e-12)
        assert row["dp_delta"] == pytest.approx(delta) and row["dp_clip"] == 0.01 and row["dp_noise_multiplier"] == 1.5
        assert 0 <= row["dp_clipped_clients"] <= 3
    assert rows[0]["dp_clipped_clients"] == 3  # a clip of 0.01 binds every update of this model
    facts = model_card_facts(trainer.strategy, 2)[PRIVACY_KEY]
    assert facts["epsilon"] == pytest.approx(rows[-1]["dp_epsilon"]) and facts["covers_global_model"] is True
    plain = make_trainer("ffa_lora", tmp_path / "plain", num_clients=6, clients_per_round=3)
    assert model_card_facts(plain.strategy, 2) == {}


def test_the_trainer_refuses_a_method_dp_cannot_cover_before_training(tmp_path):
    with pytest.raises(ClientLevelDPUnsupportedError, match="client-level DP refused: flexlora"):
        make_trainer("flexlora", tmp_path, dp_clip=1.0, dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"must be < 1/num_clients"):
        make_trainer("fedit", tmp_path, num_clients=4, dp_clip=1.0, dp_noise_multiplier=1.0, dp_delta=0.3)


def _report(info: FederatedRunInfo) -> ExportReport:
    return ExportReport(output_dir="out", kind="adapter", rank=2, layer_ranks={"q": 2}, layer_errors={"q": 0.0}, run_info=info)


@pytest.mark.parametrize("covers_global_model", [True, False])
def test_the_model_card_states_the_guarantee(covers_global_model):
    guarantee = dict(
        epsilon=3.21, delta=1e-5, noise_multiplier=1.7, clip=0.5, num_clients=1000, clients_per_round=50, rounds=40,
        covers_global_model=covers_global_model, unit="one client", accountant="dp-accounting RDP",
    )  # fmt: skip
    info = FederatedRunInfo(method="fedit", rounds=40, num_clients=1000, clients_per_round=50,
                            extra={PRIVACY_KEY: guarantee, "partition": "iid"})  # fmt: skip
    text = _card_text(_report(info), "base", "BertModel", None, None, False)
    assert "## Privacy" in text and "(epsilon = 3.21, delta = 1e-05)" in text and "The unit of privacy is one client" in text
    assert "| partition | iid |" in text and f"| {PRIVACY_KEY} |" not in text
    assert ("NOT this adapter as a whole" in text) is not covers_global_model
    no_dp = FederatedRunInfo(method="fedit", rounds=40, num_clients=1000)
    assert "## Privacy" not in _card_text(_report(no_dp), "base", "BertModel", None, None, False)
