"""Speed of the federated runtime on the CPU: engine overhead, a round's breakdown, batched vs sequential clients.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/speed.py --output_dir benchmarks/results/speed

all-MiniLM-L6-v2 on WordNet multiple choice (the default run's model and data), batch 8, 8 local steps. Writes
``speed.json`` (every figure, the command and the machine's load) and ``throughput.png``, ``breakdown.png``,
``overhead.png`` under ``--output_dir``. Only ``trainer.train()`` (or the plain ``Trainer.train()``) is timed:
loading the model and tokenising the data are not part of a round.

* ``overhead``: a FedIT run of ``--overhead_rounds`` rounds x 3 clients x 8 steps, sequential and batched, without
  evaluation or checkpoints, against the same number of optimizer steps (batch 8) in one plain
  ``transformers.Trainer.train()`` on the same PEFT model, interleaved ``--overhead_repeats`` times: the engine's
  cost is the ratio of the two times, also per token position computed (the runs draw different batches), and
  the share of a run's time spent outside ``Trainer.training_step``.
* ``breakdown``: the default run's method (FedSmoothLoRA), 3 clients x 8 steps, evaluation and a checkpoint every
  round: seconds per round in client initialisation, local training, aggregation, evaluation, checkpoint, other.
* ``throughput``: FedIT rounds with K = 1, 2, 4, 8, 16 clients (16 clients in all), ``--throughput_steps`` each: clients per
  second, sequential and batched (the last of ``--throughput_rounds`` rounds, so start-up costs are excluded).
* ``init``: FedSmoothLoRA's client initialisation (gradient estimate + SVDs + offsets) against its N_ga plain
  forward/backward passes alone, and its share of a client's round at 8 steps, one local epoch and 200 steps
  (those two computed from the measured time per local step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

THROUGHPUT_CLIENTS = (1, 2, 4, 8, 16)
MODES = ("clients", "batched")
MODE_LABELS = {"clients": "sequential", "batched": "batched"}


def _config(workdir: Path, **settings: Any):
    from peft_fed.runtime.pipeline import FederatedRunConfig

    base = dict(
        local_steps=8, per_device_train_batch_size=8, eval_every=0, disable_tqdm=True, overwrite_output_dir=True,
        report_to="none", use_cpu=True, output_dir=str(workdir / "run"),
    )  # fmt: skip
    return FederatedRunConfig.from_dict({**base, **settings})


def _trainer(config, *, evaluate: bool):
    from peft_fed.runtime.pipeline import load_run
    from peft_fed.runtime.trainer import FederatedTrainer

    run = load_run(config)
    trainer = FederatedTrainer(
        model=run.model,
        args=config.training_args,
        client_datasets=run.client_train,
        eval_dataset=run.evaluation if evaluate else None,
        **run.trainer_kwargs(),
    )
    trainer.prepare_output_dir()
    return trainer, run


def _timed_train(trainer) -> float:
    tic = time.perf_counter()
    trainer.train()
    return time.perf_counter() - tic


class _StepMeter:
    """Seconds and token positions inside ``transformers.Trainer.training_step``: the optimizer steps' own work.

    A federated run and a plain ``Trainer`` run draw different batches (each client shuffles its own rows), so
    their padded lengths differ; counting the positions each step computed lets the two be compared per token.
    The batched executor has its own loop (no ``training_step``), so it reads zero here.
    """

    def __enter__(self) -> _StepMeter:
        from transformers import Trainer

        self.seconds, self.steps, self.positions = 0.0, 0, 0
        self._original = original = Trainer.training_step

        def timed(trainer, model, inputs, *args, **kwargs):
            tic = time.perf_counter()
            try:
                return original(trainer, model, inputs, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - tic
                self.steps += 1
                self.positions += int(inputs["input_ids"].numel())

        Trainer.training_step = timed
        return self

    def __exit__(self, *exc: object) -> None:
        from transformers import Trainer

        Trainer.training_step = self._original


def _plain_trainer(run, workdir: Path, steps: int):
    from datasets import concatenate_datasets
    from transformers import Trainer, TrainingArguments

    return Trainer(
        model=run.model,
        args=TrainingArguments(
            output_dir=str(workdir / "plain"), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
            lr_scheduler_type="constant", save_strategy="no", logging_strategy="no", report_to="none", use_cpu=True,
            remove_unused_columns=False, disable_tqdm=True, seed=42,
        ),  # fmt: skip
        train_dataset=concatenate_datasets(run.client_train),
        data_collator=run.task.collator(run.tokenizer),
    )


def measure_overhead(workdir: Path, rounds: int, repeats: int) -> dict[str, Any]:
    """FedIT federated runs (sequential, batched) against the same number of optimizer steps in one plain
    ``Trainer.train()``, interleaved ``repeats`` times (sequential, batched, plain, sequential, ...) so that the
    other jobs of a shared machine weigh on all three alike. Each run gets a freshly loaded model; only ``train()``
    is timed."""
    steps = rounds * 3 * 8
    result: dict[str, Any] = {"rounds": rounds, "clients_per_round": 3, "local_steps": 8, "batch": 8,
                              "plain_trainer_steps": steps, "repeats": repeats}  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in (*MODE_LABELS.values(), "plain")}
    for _ in range(repeats):
        for mode in (*MODES, "plain"):
            if mode == "plain":
                _, run = _trainer(_config(workdir, method="fedit", num_rounds=1), evaluate=False)
                trainer, label = _plain_trainer(run, workdir, steps), "plain"
            else:
                config = _config(workdir, method="fedit", num_rounds=rounds, clients_per_round=3, parallel_mode=mode)
                trainer, _ = _trainer(config, evaluate=False)
                assert trainer.parallel_mode == mode, trainer.parallel_mode
                label = MODE_LABELS[mode]
            load = os.getloadavg()[0]
            with _StepMeter() as meter:
                seconds = _timed_train(trainer)
            runs[label].append({"seconds": seconds, "in_step_seconds": meter.seconds, "steps": meter.steps,
                                "token_positions": meter.positions, "load_average_1min": load})  # fmt: skip
            print(f"overhead {label}: {json.dumps(runs[label][-1])}", flush=True)
    result["runs"] = runs
    plain = runs["plain"]
    for label, measured in runs.items():
        result[f"{label}_seconds"] = statistics.median(r["seconds"] for r in measured)
        if label == "plain":
            continue
        # run i of a design against plain run i: the two closest in time
        result[f"{label}_overhead_ratio"] = statistics.median(
            r["seconds"] / p["seconds"] for r, p in zip(measured, plain, strict=True)
        )
    sequential = runs["sequential"]
    result["sequential_overhead_ratio_per_token_position"] = statistics.median(
        (r["seconds"] / r["token_positions"]) / (p["seconds"] / p["token_positions"])
        for r, p in zip(sequential, plain, strict=True)
    )
    for label in ("sequential", "plain"):
        result[f"{label}_share_outside_training_step"] = statistics.median(
            1 - r["in_step_seconds"] / r["seconds"] for r in runs[label]
        )
    return result


def measure_breakdown(workdir: Path, rounds: int) -> dict[str, Any]:
    result: dict[str, Any] = {
        "method": "fedsmoothlora",
        "rounds": rounds,
        "clients_per_round": 3,
        "local_steps": 8,
    }
    for mode in MODES:
        config = _config(workdir, method="fedsmoothlora", num_rounds=rounds, clients_per_round=3, eval_every=1,
                         save_every=1, parallel_mode=mode)  # fmt: skip
        trainer, _ = _trainer(config, evaluate=True)
        checkpoint_seconds: list[float] = []
        save = trainer.save_federated_checkpoint

        def timed_save(completed_rounds, save=save, checkpoint_seconds=checkpoint_seconds):
            tic = time.perf_counter()
            save(completed_rounds)
            checkpoint_seconds.append(time.perf_counter() - tic)

        trainer.save_federated_checkpoint = timed_save
        wall = _timed_train(trainer)
        history = trainer.history
        per_round = {
            "init": statistics.mean(r["init_seconds"] for r in history),
            # the local wall time less the initialisation: training, reading back, client_end
            "local_training": statistics.mean(
                r["round_local_wall_seconds"] - r["init_seconds"] for r in history
            ),
            "aggregation": statistics.mean(r["aggregation_seconds"] for r in history),
            "evaluation": statistics.mean(r["eval_seconds"] for r in history),
            "checkpoint": statistics.mean(checkpoint_seconds),
        }
        per_round["other"] = wall / rounds - sum(per_round.values())
        result[MODE_LABELS[mode]] = {"round_seconds": wall / rounds, "per_round": per_round}
        result[MODE_LABELS[mode]]["seconds_per_local_step"] = statistics.mean(
            r["local_train_seconds"] / (3 * 8) for r in history
        )
        if mode == "clients":
            result["mean_client_samples"] = statistics.mean(len(d) for d in trainer.client_datasets)
    return result


def measure_throughput(workdir: Path, rounds: int, ks: tuple[int, ...], steps: int) -> dict[str, Any]:
    result: dict[str, Any] = {
        "method": "fedit",
        "num_clients": max(ks),
        "local_steps": steps,
        "rounds": rounds,
        "K": {},
    }
    for k in ks:
        entry = {}
        for mode in MODES:
            config = _config(workdir, method="fedit", num_rounds=rounds, num_clients=max(ks), clients_per_round=k,
                             local_steps=steps, parallel_mode=mode)  # fmt: skip
            trainer, _ = _trainer(config, evaluate=False)
            trainer.train()
            seconds = trainer.history[-1]["round_local_wall_seconds"]
            entry[MODE_LABELS[mode]] = {"round_local_seconds": seconds, "clients_per_second": k / seconds}
            if (
                trainer._batched_executor is not None
            ):  # tokens computed jointly / what the clients' own batches pad to
                positions = trainer._batched_executor.positions
                entry["batched"]["padding_ratio"] = positions["joint"] / positions["per_client"]
        entry["speedup"] = entry["batched"]["clients_per_second"] / entry["sequential"]["clients_per_second"]
        result["K"][str(k)] = entry
        print(f"K={k}: {json.dumps(entry)}", flush=True)
    return result


def measure_init(workdir: Path, repeats: int) -> dict[str, Any]:
    from peft_fed import peft_bridge
    from peft_fed.engine import client_seed

    config = _config(workdir, method="fedsmoothlora", num_rounds=1, clients_per_round=3)
    trainer, _ = _trainer(config, evaluate=False)
    n_ga = trainer.strategy.gradient_batches()
    dataset = trainer.client_datasets[0]
    batches = trainer._gradient_batches(dataset, client_seed(42, 0, "0"))()
    model = trainer.model

    def plain_passes() -> None:  # N_ga ordinary training forward/backward passes (LoRA factors get gradients)
        for batch in batches:
            trainer._task_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    def estimate() -> None:
        gradients = peft_bridge.full_weight_gradients(model, batches, trainer._task_loss)
        # the estimate stays on the model's device (no copy to the CPU that would wait for it): wait here
        next(iter(gradients.values())).sum().item()

    state = trainer.client_states["0"]
    broadcast = trainer.strategy.configure(trainer.server_state, state)

    def gradient_fn(offsets):
        return peft_bridge.full_weight_gradients(model, batches, trainer._task_loss, offsets)

    def initialisation() -> None:  # what a client's round spends before its first local step
        trainer.strategy.client_begin(broadcast, state, gradient_fn)

    timings: dict[str, list[float]] = {
        "plain_forward_backward": [],
        "gradient_estimate": [],
        "initialisation": [],
    }
    functions = {
        "plain_forward_backward": plain_passes,
        "gradient_estimate": estimate,
        "initialisation": initialisation,
    }
    for function in functions.values():
        function()  # warm-up
    for _ in range(repeats):
        for name, function in functions.items():
            tic = time.perf_counter()
            function()
            timings[name].append(time.perf_counter() - tic)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    return {
        "num_gradient_batches": n_ga,
        "repeats": repeats,
        "median_seconds": medians,
        "initialisation_over_forward_backward": medians["initialisation"] / medians["plain_forward_backward"],
        "svd_and_offsets_seconds": medians["initialisation"] - medians["gradient_estimate"],
    }


def init_shares(init: dict[str, Any], breakdown: dict[str, Any]) -> dict[str, Any]:
    """Initialisation's share of a client's round at 8 steps, one epoch and 200 steps (from the measured times)."""
    per_step = breakdown["sequential"]["seconds_per_local_step"]
    init_seconds = init["median_seconds"]["initialisation"]
    epoch_steps = -(-breakdown["mean_client_samples"] // 8)
    shares = {}
    for label, steps in (("8_steps", 8), ("1_epoch", epoch_steps), ("200_steps", 200)):
        shares[label] = {"local_steps": steps, "init_share": init_seconds / (init_seconds + steps * per_step)}
    return {"seconds_per_local_step": per_step, "init_seconds": init_seconds, "shares": shares}


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "throughput" in results:
        ks = [int(k) for k in results["throughput"]["K"]]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label in ("sequential", "batched"):
            ax.plot(
                ks,
                [results["throughput"]["K"][str(k)][label]["clients_per_second"] for k in ks],
                "o-",
                label=label,
            )
        ax.set(xscale="log", xticks=ks, xticklabels=[str(k) for k in ks], xlabel="clients per round K",
               ylabel="clients per second", title=f"MiniLM, WordNet MC, {results['throughput']['local_steps']} steps, CPU (1 thread)")  # fmt: skip
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=120)
        plt.close(fig)
    if "breakdown" in results:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        parts = list(results["breakdown"]["sequential"]["per_round"])
        bottom = [0.0, 0.0]
        for part in parts:
            values = [
                max(0.0, results["breakdown"][label]["per_round"][part])
                for label in ("sequential", "batched")
            ]
            ax.bar(["sequential", "batched"], values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set(ylabel="seconds per round", title="FedSmoothLoRA round, 3 clients x 8 steps")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "breakdown.png", dpi=120)
        plt.close(fig)
    if "overhead" in results:
        o = results["overhead"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        labels = ["plain Trainer", "sequential", "batched"]
        bars = ax.bar(labels, [o["plain_seconds"], o["sequential_seconds"], o["batched_seconds"]])
        ratios = ["1.00", f"{o['sequential_overhead_ratio']:.2f}", f"{o['batched_overhead_ratio']:.2f}"]
        ax.bar_label(bars, labels=[f"x{r}" for r in ratios])
        ax.set(ylabel="seconds (median)",
               title=f"{o['plain_trainer_steps']} optimizer steps (batch 8), {o['repeats']} interleaved repeats")
        fig.tight_layout()
        fig.savefig(out / "overhead.png", dpi=120)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", default="benchmarks/results/speed")
    parser.add_argument("--parts", nargs="+", default=["overhead", "breakdown", "throughput", "init"],
                        choices=["overhead", "breakdown", "throughput", "init"])  # fmt: skip
    parser.add_argument("--overhead_rounds", type=int, default=3)
    parser.add_argument("--overhead_repeats", type=int, default=3, help="Interleaved repeats of the three runs.")
    parser.add_argument("--breakdown_rounds", type=int, default=3)
    parser.add_argument("--throughput_rounds", type=int, default=2)
    parser.add_argument("--throughput_steps", type=int, default=8)
    parser.add_argument("--throughput_clients", type=int, nargs="+", default=list(THROUGHPUT_CLIENTS))
    parser.add_argument("--init_repeats", type=int, default=3)
    parser.add_argument(
        "--plot_only", action="store_true", help="Redraw the plots from speed.json; measure nothing."
    )
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "speed.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if args.plot_only:
        plot(results, out)
        return
    import torch

    results["command"] = "OMP_NUM_THREADS=1 nice -n 10 python " + " ".join(sys.argv)
    results["machine"] = {
        "device": "cpu", "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
        "gpu": "none available in this session",
    }  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="peft_fed_speed_"))
    try:
        for part in args.parts:
            tic = time.perf_counter()
            if part == "overhead":
                results["overhead"] = measure_overhead(workdir, args.overhead_rounds, args.overhead_repeats)
            elif part == "breakdown":
                results["breakdown"] = measure_breakdown(workdir, args.breakdown_rounds)
            elif part == "throughput":
                results["throughput"] = measure_throughput(
                    workdir, args.throughput_rounds, tuple(args.throughput_clients), args.throughput_steps
                )
            elif part == "init":
                results["init"] = measure_init(workdir, args.init_repeats)
            results.setdefault("part_seconds", {})[part] = time.perf_counter() - tic
            results.setdefault("part_commands", {})[part] = results["command"]
            if "init" in results and "breakdown" in results:
                results["init_shares"] = init_shares(results["init"], results["breakdown"])
            results["machine"]["load_average_at_end"] = os.getloadavg()
            path.write_text(json.dumps(results, indent=1))
            print(f"{part}: {json.dumps(results[part])}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    plot(results, out)


if __name__ == "__main__":
    main()
