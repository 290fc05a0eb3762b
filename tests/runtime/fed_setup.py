"""A tiny federated setup for runtime tests: a random BERT classifier and learnable synthetic clients."""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import numpy as np
import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tiny_models import tiny_bert  # noqa: E402

from peft_fed import FederatedTrainer, FederatedTrainingArguments  # noqa: E402
from peft_fed.strategies import method_hyperparameters  # noqa: E402
from peft_fed.strategies.hyperparameters import hyperparameter_names  # noqa: E402
from peft_fed.tuners import peft_config_class  # noqa: E402


def client_dataset(seed: int, n: int = 20, poison: bool = False) -> datasets.Dataset:
    g = np.random.default_rng(seed)
    ids = g.integers(1, 99, size=(n, 8))
    if poison:
        ids[:, 0] = 0  # PoisonTask turns these batches' loss into NaN
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(), "labels": (ids[:, 1] % 3).tolist()}
    )


def peft_model(method: str, r: int = 4, seed: int = 0):
    common = dict(r=r, lora_alpha=2 * r, target_modules=["query", "value"], modules_to_save=["classifier"])
    return get_peft_model(tiny_bert(seed=seed), peft_config_class(method)(**common))


class PoisonTask:
    """Task whose loss is NaN on batches that start with token 0 (a client with corrupted data)."""

    def compute_loss(self, model, inputs):
        out = model(**inputs)
        loss = out.loss
        if (inputs["input_ids"][:, 0] == 0).any():
            loss = loss * float("nan")
        return loss, out.logits

    def compute_metrics(self, eval_pred):
        return {"accuracy": float((eval_pred.predictions.argmax(-1) == eval_pred.label_ids).mean())}


def accuracy(eval_pred):
    return {"accuracy": float((eval_pred.predictions.argmax(-1) == eval_pred.label_ids).mean())}


def make_trainer(method: str, output_dir, num_clients: int = 4, clients=None, model=None, **overrides) -> FederatedTrainer:
    kwargs = dict(
        output_dir=str(output_dir), method=method, num_rounds=2, clients_per_round=2, local_steps=2,
        per_device_train_batch_size=4, learning_rate=1e-2, report_to="none", use_cpu=True, seed=42,
    )
    trainer_kwargs = {k: overrides.pop(k) for k in ("task", "compute_metrics", "callbacks") if k in overrides}
    # N_ga for the methods that estimate a gradient (ignored by the others, so one setting serves every method)
    gradient_batches = overrides.pop("num_gradient_batches", None)
    if gradient_batches is not None and "num_gradient_batches" in hyperparameter_names(method_hyperparameters(method)):
        overrides["method_kwargs"] = {**(overrides.get("method_kwargs") or {}), "num_gradient_batches": gradient_batches}
    kwargs.update(overrides)
    trainer_kwargs.setdefault("compute_metrics", accuracy)
    return FederatedTrainer(
        model=model if model is not None else peft_model(method),
        args=FederatedTrainingArguments(**kwargs),
        client_datasets=clients if clients is not None else [client_dataset(i) for i in range(num_clients)],
        eval_dataset=client_dataset(99),
        **trainer_kwargs,
    )


def assert_states_close(actual, expected, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Same keys, and every tensor close (exactly equal by default)."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=atol, rtol=rtol, msg=key)


def final_state(trainer) -> dict[str, torch.Tensor]:
    """The global adapter and backbone a run ends with."""
    from peft_fed import peft_bridge

    state = {f"{n}.B": f.B for n, f in peft_bridge.get_factors(trainer.model).items()}
    state.update({f"{n}.A": f.A for n, f in peft_bridge.get_factors(trainer.model).items()})
    state.update({f"{n}.W": w for n, w in peft_bridge.base_weights(trainer.model).items()})
    state.update(peft_bridge.get_extras(trainer.model, trainer.extra_names))
    return state


def main(argv=None) -> None:
    """One run (the multi-process, kill-and-resume and fault-injection tests run it in a subprocess)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("out")
    parser.add_argument("--num_rounds", type=int, default=2)
    parser.add_argument("--save_every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--slow_save", type=float, default=0.0,
                        help="fault injection: sleep this long around each file of a checkpoint write, so that kills "
                        "land inside the write more often")  # fmt: skip
    cli = parser.parse_args(argv)
    if cli.slow_save:
        _slow_down_checkpoint_writes(cli.slow_save)
    method, out = cli.method, cli.out
    trainer = make_trainer(method, out, num_clients=5, clients_per_round=3, num_rounds=cli.num_rounds,
                           save_every=cli.save_every, resume=cli.resume, disable_tqdm=True)
    trainer.train()
    if trainer.is_world_process_zero():
        torch.save(final_state(trainer), Path(out) / "final_state.pt")
    if trainer.accelerator.num_processes > 1:  # each process's own history (the main one also writes metrics.jsonl)
        import json

        rank = trainer.accelerator.process_index
        (Path(out) / f"history-{rank}.json").write_text(json.dumps(trainer.history))


def _slow_down_checkpoint_writes(seconds: float) -> None:
    import time

    from peft_fed.runtime import checkpoint

    save_file, fsync_dir = checkpoint.save_file, getattr(checkpoint, "_fsync_dir", lambda path: None)

    def slow_save_file(*args, **kwargs):
        time.sleep(seconds)
        return save_file(*args, **kwargs)

    def slow_fsync_dir(*args, **kwargs):
        time.sleep(seconds)
        return fsync_dir(*args, **kwargs)

    checkpoint.save_file, checkpoint._fsync_dir = slow_save_file, slow_fsync_dir


def serve() -> None:
    """A fork server for the fault-injection test: import everything once, then run each requested run in a
    forked child (a real process, killed for real) without paying the imports again.

    stdin ``["fedsmoothlora", "OUT", ...]`` (JSON) -> forks a child running ``main`` with those arguments, its
    output to ``OUT.log``, and answers its pid; ``wait PID`` -> answers its exit status (``-9`` when SIGKILLed).
    No torch operation runs in this process before a fork (OMP_NUM_THREADS=1 in the tests), so forking is safe.
    """
    import json
    import os

    import peft_fed.runtime.trainer  # noqa: F401  (the heavy imports, once)

    answer = os.fdopen(os.dup(1), "w")
    answer.write("ready\n")
    answer.flush()
    for line in sys.stdin:
        line = line.strip()
        if line.startswith("wait "):
            _, status = os.waitpid(int(line.split()[1]), 0)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            answer.write(f"{code}\n")
            answer.flush()
            continue
        argv = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(f"{argv[1]}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(log, 1)
                os.dup2(log, 2)
                main(argv)
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        answer.write(f"{pid}\n")
        answer.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        main()
