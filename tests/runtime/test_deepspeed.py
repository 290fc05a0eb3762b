"""FederatedTrainer under DeepSpeed ZeRO-3 (on CPU) gives the result of a plain run.

The ZeRO-3 runs happen in subprocesses (DeepSpeed needs a process group, even for one process, and must not
leave one in the pytest process): one process with a hand-set torch.distributed environment, and two processes
under ``torch.distributed.run`` (each client trained data-parallel, half of each batch per process). The
persistence threshold is 0 so that even this tiny model's parameters are really partitioned (empty locally).

Compared with the plain run: the final global adapter factors, the backbone weights of the adapted layers, the
heads, the per-round train (and eval) losses, and the adapter exported from the final model. FedSmoothLoRA
exercises merges into the sharded backbone, backbone offsets and the gradient estimate; FedIT plain averaging.
DeepSpeed computes some operations its own way (its ``F.linear`` replacement, gradient clipping and reduction
order), so results agree to float rounding, which FedSmoothLoRA's SVDs amplify to ~1e-5 in the backbone.

Run directly, this file is the worker: ``python test_deepspeed.py OUT PER_DEVICE_BATCH CASE...``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fed_setup import assert_states_close, final_state, make_trainer, peft_model

pytest.importorskip("deepspeed")

ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}
# Small on purpose: 4 clients, 2 per round, 2 rounds of 2 local steps, N_ga = 2. 20 eval samples in batches
# of 5: with two processes the eval batches split evenly (Accelerate pads an uneven last batch with repeated
# samples, and the Trainer's eval_loss then weights them in, which is not what is compared here).
RUN = dict(num_clients=4, num_gradient_batches=2, per_device_eval_batch_size=5)
EXPORT_RANK = 4
METHODS = ("fedsmoothlora", "fedit")
ROOT = Path(__file__).resolve().parents[2]


def _outcome(trainer, history) -> dict:
    return {
        "state": final_state(trainer),
        "train_loss": [row["train_loss"] for row in history],
        "eval_loss": [row["eval_loss"] for row in history],
    }


def _export(trainer, path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from peft_fed import peft_bridge
    from peft_fed.export import export_adapter

    with peft_bridge.full_parameters(trainer.model):  # every process; the export itself on the main one
        if trainer.is_world_process_zero():
            export_adapter(trainer.model, trainer.original_weights, path, rank=EXPORT_RANK, overwrite=True)
    trainer.accelerator.wait_for_everyone()
    return load_file(str(path / "adapter_model.safetensors"))


def _worker(out: Path, batch: int, cases: list[str]) -> None:
    """Under DeepSpeed: run each case with ZeRO-3 and save what the test compares (main process)."""
    import deepspeed

    from peft_fed import peft_bridge

    results: dict = {}
    for case in cases:
        method = case.split("-")[0]
        kwargs = dict(RUN, deepspeed=ZERO3, per_device_train_batch_size=batch)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # BERT's classification loss ignores num_items_in_batch, so the Trainer's cross-device token
            # averaging would scale loss and gradients by the number of processes
            kwargs["average_tokens_across_devices"] = False
        if case.endswith("-preinit"):
            # partitioned before the trainer exists, like a model loaded under zero.Init: the first gradient
            # estimate runs before any DeepSpeed engine (and its parameter-fetching hooks) exists
            model = peft_model(method)
            init_config = {"zero_optimization": ZERO3["zero_optimization"], "train_micro_batch_size_per_gpu": batch}
            deepspeed.zero.Init(module=model, config_dict_or_path=init_config)
            kwargs["model"] = model
        tic = time.perf_counter()
        trainer = make_trainer(method, out / case, **kwargs)
        assert trainer.is_zero3_enabled and trainer.parallel_mode == "data"
        history = trainer.train()
        seconds = time.perf_counter() - tic
        layers = peft_bridge.lora_layers(trainer.model).values()
        partitioned = all(
            peft_bridge.is_zero3_param(p) and p.numel() == 0
            for layer in layers
            for p in (layer.get_base_layer().weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        )
        results[case] = {
            **_outcome(trainer, history),
            "export": _export(trainer, out / case / "export"),
            "partitioned": partitioned,
            "seconds": seconds,
        }
    try:  # a loss term on the live factors (Subspace-Reg) is refused under ZeRO-3, before any training
        make_trainer("subspace_reg", out / "subspace_reg", **dict(RUN, deepspeed=ZERO3))
        results["subspace_reg_error"] = None
    except NotImplementedError as error:
        results["subspace_reg_error"] = str(error)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out / "zero3.pt")


# ---------------------------------------------------------------------------------------------------- tests


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out: Path, processes: int, batch: int, cases) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1" if processes > 1 else "2"}
    if processes == 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        command = [sys.executable, __file__]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__]
    done = subprocess.run([*command, str(out), str(batch), *cases], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out / "zero3.pt", weights_only=False)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The reference: the same runs without DeepSpeed, in this process (batch 4, one process)."""
    from safetensors.torch import load_file

    from peft_fed.export import export_adapter

    out = tmp_path_factory.mktemp("plain")
    results = {}
    for method in METHODS:
        trainer = make_trainer(method, out / method, **RUN)
        history = trainer.train()
        export_adapter(trainer.model, trainer.original_weights, out / method / "export", rank=EXPORT_RANK)
        results[method] = {
            **_outcome(trainer, history),
            "export": load_file(str(out / method / "export" / "adapter_model.safetensors")),
        }
    return results


def _assert_same_run(zero3: dict, plain: dict, atol: float, loss_atol: float) -> None:
    assert zero3["partitioned"], "the ZeRO-3 run did not partition the adapted layers' parameters"
    # full tensors, not ZeRO-3's empty partitions, with the plain run's values
    assert_states_close(zero3["state"], plain["state"], atol=atol)
    torch.testing.assert_close(torch.tensor(zero3["train_loss"]), torch.tensor(plain["train_loss"]), atol=loss_atol, rtol=0)
    torch.testing.assert_close(torch.tensor(zero3["eval_loss"]), torch.tensor(plain["eval_loss"]), atol=loss_atol, rtol=0)
    assert_states_close(zero3["export"], plain["export"], atol=10 * atol)


@pytest.mark.slow
def test_zero3_one_process_equals_plain(tmp_path, plain):
    cases = [*METHODS, "fedsmoothlora-preinit"]
    zero3 = _launch(tmp_path, processes=1, batch=4, cases=cases)
    for case in cases:
        _assert_same_run(zero3[case], plain[case.split("-")[0]], atol=1e-4, loss_atol=1e-5)
    assert "ZeRO-3" in (zero3["subspace_reg_error"] or ""), "subspace_reg was not refused under ZeRO-3"
    print(json.dumps({case: round(zero3[case]["seconds"], 1) for case in cases}))


@pytest.mark.slow
def test_zero3_two_processes_equal_plain(tmp_path, plain):
    # each client trained by both processes on half of every batch: per-device batch 2 x 2 = the plain batch 4
    zero3 = _launch(tmp_path, processes=2, batch=2, cases=list(METHODS))
    for method in METHODS:
        _assert_same_run(zero3[method], plain[method], atol=1e-4, loss_atol=1e-5)
    print(json.dumps({method: round(zero3[method]["seconds"], 1) for method in METHODS}))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
