"""parallel_mode="batched": the round's clients trained together end where the sequential clients end."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from fed_setup import PoisonTask, assert_states_close, client_dataset, final_state, make_trainer

from peft_fed.linalg import LowRank
from peft_fed.strategies.registry import STRATEGIES

# Adam turns a rounding-level difference in a near-zero gradient into an lr-sized step (lr 1e-2 here), so the
# two loop orders agree to about 1e-4, not to the last bit; a client trained with another's gradient, clipped
# by the joint norm or stepped once too often is off by 1e-3 to 1e-1.
TOLERANCE = dict(atol=2e-4, rtol=2e-3)


def _pair(tmp_path, method, **overrides):
    """The same run trained sequentially and batched: (sequential trainer, batched trainer)."""
    trainers = []
    for mode in ("clients", "batched"):
        trainer = make_trainer(
            method, tmp_path / mode, parallel_mode=mode, disable_tqdm=True, eval_every=0, **overrides
        )
        assert trainer.parallel_mode == mode
        trainer.train()
        trainers.append(trainer)
    return trainers


def _assert_same_run(sequential, batched) -> None:
    assert_states_close(final_state(batched), final_state(sequential), **TOLERANCE)
    for seq_row, bat_row in zip(sequential.history, batched.history, strict=True):
        assert bat_row["clients"] == seq_row["clients"] and set(bat_row["dropped_clients"]) == set(
            seq_row["dropped_clients"]
        )
        for key in ("client_loss_first", "client_loss_last"):
            for cid, value in seq_row[key].items():
                assert math.isclose(bat_row[key][cid], value, rel_tol=1e-4) or (
                    math.isnan(value) and math.isnan(bat_row[key][cid])
                )
    for cid, state in sequential.client_states.items():
        other = batched.client_states[cid]
        assert (other.last_round, other.backbone_version) == (state.last_round, state.backbone_version)
        assert_states_close(other.state_dict()[0], state.state_dict()[0], **TOLERANCE)


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_batched_round_equals_sequential(tmp_path, method):
    # 3 of 4 clients per round: partial participation, returning and new clients in round 2
    sequential, batched = _pair(tmp_path, method, clients_per_round=3, num_gradient_batches=2)
    _assert_same_run(sequential, batched)


@pytest.mark.parametrize("exact_round_matching", [False, True])
def test_fedsmoothlora_clients_at_different_backbone_versions(tmp_path, exact_round_matching):
    # exact Round-Matching: the offsets' ranks grow with the updates a client missed (padded, or dense, per step)
    versions_sent: list[list[int]] = []
    sequential, batched = None, None
    for mode in ("clients", "batched"):
        trainer = make_trainer("fedsmoothlora", tmp_path / mode, num_clients=5, clients_per_round=2, num_rounds=4,
                               num_gradient_batches=2, parallel_mode=mode, disable_tqdm=True, eval_every=0,
                               method_kwargs={"exact_round_matching": exact_round_matching})  # fmt: skip
        configure = trainer.strategy.configure

        def recording_configure(state, client=None, configure=configure, mode=mode):
            broadcast = configure(state, client)
            if mode == "batched":
                versions_sent.append([state.round, broadcast.backbone_catch_up.num_updates])
            return broadcast

        trainer.strategy.configure = recording_configure
        trainer.train()
        sequential, batched = (trainer, batched) if mode == "clients" else (sequential, trainer)
    by_round: dict[int, set[int]] = {}
    for round_index, missed in versions_sent:
        by_round.setdefault(round_index, set()).add(missed)
    assert any(len(missed) > 1 for missed in by_round.values()), by_round  # one round mixes backbone versions
    _assert_same_run(sequential, batched)


def test_subspace_reg_loss_term_is_applied_per_client(tmp_path):
    # a strong regulariser: without it (or with another client's anchor) the factors end far apart
    strong = {"mu": 2.0, "beta": 1.0, "lam": 0.1}
    sequential, batched = _pair(
        tmp_path / "strong", "subspace_reg", clients_per_round=3, method_kwargs=strong
    )
    _assert_same_run(sequential, batched)
    _, unregularised = _pair(tmp_path / "none", "subspace_reg", clients_per_round=3,
                             method_kwargs={"mu": 0.0, "beta": 0.0, "lam": 0.0})  # fmt: skip
    differences = [
        float((final_state(batched)[key] - value).abs().max())
        for key, value in final_state(unregularised).items()
    ]
    assert max(differences) > 100 * TOLERANCE["atol"]


def test_nan_client_is_dropped_without_affecting_the_others(tmp_path):
    runs = []
    for mode in ("clients", "batched"):
        trainer = make_trainer("fedit", tmp_path / mode, clients_per_round=3, parallel_mode=mode, disable_tqdm=True,
                               eval_every=0, num_rounds=1)  # fmt: skip
        client_begin = trainer.strategy.client_begin

        def poisoned_begin(broadcast, client_state, gradient_fn=None, client_begin=client_begin):
            start = client_begin(broadcast, client_state, gradient_fn)
            if client_state.client_id == "2":  # this client's start is corrupt: its loss is NaN from step 1
                start.factors = {  # new tensors: the broadcast's are shared with the server state
                    name: LowRank(f.B, torch.full_like(f.A, float("nan")))
                    for name, f in start.factors.items()
                }
            return start

        trainer.strategy.client_begin = poisoned_begin
        trainer.train()
        runs.append(trainer)
    sequential, batched = runs
    assert "2" in batched.history[0]["clients"] and set(batched.history[0]["dropped_clients"]) == {"2"}
    assert batched.client_states["2"].last_round is None
    _assert_same_run(sequential, batched)


def test_client_with_fewer_local_steps_stops_after_its_last_step(tmp_path):
    # one epoch each at batch 4: client 0 has 3 steps (4, 4, 2 examples), clients 1 and 2 have 5 (20 examples)
    clients = [client_dataset(0, n=10), client_dataset(1), client_dataset(2)]
    sequential, batched = _pair(tmp_path, "fedit", clients=clients, clients_per_round=3, local_epochs=1,
                                num_rounds=1)  # fmt: skip
    _assert_same_run(sequential, batched)
    # the short client's upload equals its own 3-step sequential round (Adam would move it on zero gradients)
    executor = batched._batched_executor
    record_steps = {}
    original = executor._finish

    def counting_finish(slot, *args, **kwargs):
        record_steps[slot.task.client_id] = (slot.steps_done, len(slot.losses))
        return original(slot, *args, **kwargs)

    executor._finish = counting_finish
    batched.args.num_rounds = 2
    batched.train()
    assert {cid: steps for cid, steps in record_steps.items() if cid == "0"} == {"0": (3, 3)}
    assert all(steps == (5, 5) for cid, steps in record_steps.items() if cid != "0")


def test_gradient_clipping_is_per_client(tmp_path):
    # a clip far below every client's gradient norm: each client's step is its own gradient scaled to norm 1e-3;
    # one norm over all clients would scale each client by the others' gradients too
    sequential, batched = _pair(tmp_path, "fedit", clients_per_round=3, max_grad_norm=1e-3, num_rounds=1)
    _assert_same_run(sequential, batched)
    executor = batched._batched_executor
    norms = []
    original = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        total = original(params, max_norm, *args, **kwargs)
        norms.append(float(total))
        return total

    torch.nn.utils.clip_grad_norm_ = recording_clip
    try:
        batched.args.num_rounds = 2
        batched.train()
    finally:
        torch.nn.utils.clip_grad_norm_ = original
    steps = batched.args.local_steps
    assert len(norms) == 3 * steps and min(norms) > 1e-3  # one clip per client per step, each active
    assert executor is batched._batched_executor


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps > 1"),
        ({"task": PoisonTask()}, "computes its own loss over the whole batch"),
    ],
)
def test_unbatchable_settings_fall_back_with_one_log_line(tmp_path, caplog, overrides, reason):
    with caplog.at_level(logging.WARNING, logger="peft_fed.runtime.trainer"):
        trainer = make_trainer("fedit", tmp_path, parallel_mode="batched", **overrides)
    assert trainer.parallel_mode == "clients" and trainer._batched_executor is None
    lines = [r.getMessage() for r in caplog.records if "parallel_mode='batched'" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0]


def _multiple_choice_run(tmp_path, task_type: str, mode: str):
    """A tiny multiple-choice federation whose items have different lengths (joint batches pad across clients)."""
    import datasets
    import numpy as np
    from peft import LoraConfig, get_peft_model
    from tiny_models import make_byte_tokenizer, tiny_bert_config, tiny_gpt2_config
    from transformers import BertForMultipleChoice, GPT2LMHeadModel

    from peft_fed import FederatedTrainer, FederatedTrainingArguments
    from peft_fed.data.tasks import TaskSpec

    tokenizer = make_byte_tokenizer(encoder=task_type == "mc_encoder")
    torch.manual_seed(0)
    if task_type == "mc_causal":  # GPT-2: Conv1D layers (fan_in_fan_out), left padding, no trainable head
        config = tiny_gpt2_config()
        config.vocab_size = len(tokenizer)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
        model = get_peft_model(GPT2LMHeadModel(config), lora)
    else:  # BERT multiple choice: its classifier is a trainable head per client
        config = tiny_bert_config()
        config.vocab_size = len(tokenizer)
        lora = LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]
        )
        model = get_peft_model(BertForMultipleChoice(config), lora)
    task = TaskSpec(task_type, num_choices=2, max_length=32)
    words = ["ab", "cde", "fghij", "k", "lmnopq", "rs", "tuvw"]

    def client(seed: int) -> datasets.Dataset:
        g = np.random.default_rng(seed)
        rows = {"ctx": [], "endings": [], "label": []}
        for _ in range(12):
            rows["ctx"].append(" ".join(g.choice(words, size=g.integers(1, 5))))
            rows["endings"].append([" ".join(g.choice(words, size=g.integers(1, 4))) for _ in range(2)])
            rows["label"].append(int(g.integers(0, 2)))
        return task.preprocess(datasets.Dataset.from_dict(rows), tokenizer)

    args = FederatedTrainingArguments(
        output_dir=str(tmp_path / mode), method="fedit", num_rounds=2, clients_per_round=3, local_steps=3,
        per_device_train_batch_size=4, report_to="none", use_cpu=True, seed=42, parallel_mode=mode,
        # SGD: a multiple-choice head's bias has a zero gradient (softmax ignores a shift), which Adam would turn
        # from rounding noise into lr-sized steps
        optim="sgd", learning_rate=0.5, disable_tqdm=True, eval_every=0, **task.training_args_overrides,
    )  # fmt: skip
    trainer = FederatedTrainer(model=model, args=args, client_datasets=[client(i) for i in range(4)], task=task,
                               data_collator=task.collator(tokenizer))  # fmt: skip
    assert trainer.parallel_mode == mode
    trainer.train()
    return trainer


@pytest.mark.parametrize("task_type", ["mc_encoder", "mc_causal"])
def test_multiple_choice_batched_equals_sequential(tmp_path, task_type):
    sequential = _multiple_choice_run(tmp_path, task_type, "clients")
    batched = _multiple_choice_run(tmp_path, task_type, "batched")
    _assert_same_run(sequential, batched)
    positions = batched._batched_executor.positions
    assert (
        positions["joint"] > positions["per_client"]
    )  # the joint batches did pad clients to each other's length


def test_offsets_are_factored_at_their_rank():
    from peft_fed.runtime.batched import _offset_factors, _per_client_matmul, _stacked_offsets

    g = torch.Generator().manual_seed(0)
    low = torch.randn(32, 3, generator=g) @ torch.randn(3, 24, generator=g)  # rank 3
    lower = torch.randn(32, 1, generator=g) @ torch.randn(1, 24, generator=g)  # rank 1: padded to rank 3
    full = torch.randn(32, 24, generator=g)
    right, left = _offset_factors(low)
    assert right.shape == (24, 3) and left.shape == (3, 32)
    assert _offset_factors(full)[1] is None  # factors of rank 24 would be larger than the matrix: kept dense
    x = torch.randn(2 * 5, 24, generator=g)
    A_t, B_t = torch.zeros(3, 24, 4), torch.zeros(3, 4, 32)  # shapes only: n = 24, m = 32, three clients
    for offsets in (
        [_offset_factors(low), None, _offset_factors(lower)],
        [_offset_factors(low), None, _offset_factors(full)],
    ):
        stacks = _stacked_offsets(offsets, A_t, B_t)
        rows = torch.cat([x, x[:5]])  # client 0: 5 rows, client 1: 5 rows, client 2: 5 rows
        out = _per_client_matmul(rows, [5, 5, 5], *stacks)
        dense = [low, torch.zeros(32, 24), lower if offsets[2][1] is not None else full]
        expected = torch.cat([chunk @ d.mT for chunk, d in zip(rows.split(5), dense, strict=True)])
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
