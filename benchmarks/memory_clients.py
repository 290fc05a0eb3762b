"""Many simulated clients in one process: peak memory and seconds per round at 10, 100 and 1,000 clients.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/memory_clients.py --num_clients 10 100 1000 --rows_per_client 12 \\
        --output benchmarks/results/memory_clients.json

FedSmoothLoRA on all-MiniLM-L6-v2 (WordNet multiple choice, the default run's model and data, enlarged to 12,800
training rows so that 1,000 clients each hold a full batch), ``--clients_per_round`` sampled per round, the same
local steps per client at every client count (and with ``--rows_per_client`` the same data per client too). Each client count runs in its own
process, so its peak RSS (``ru_maxrss``) is its own. The engine's client states live in a
:class:`~peft_fed.engine.ClientStateStore` with ``--memory_budget_mib`` of resident tensors, the rest spilled to
safetensors files. Per client count the result records:

* peak RSS after loading the model and the partitioned, tokenised data; after the rounds; after every client holds a
  state (``--fill_all``: every client is given a state of the trained clients' shapes, what ~N/K rounds would leave);
* seconds per round (each of ``--num_rounds``; the first one carries warm-up costs) and their median over the
  rounds after the first, against the run with the fewest clients;
* the model's bytes, what N model copies would take, the clients' state bytes, how many were spilled;
* seconds of a checkpoint of every client's state (``save_checkpoint``: it writes every client's state, so it grows
  with the clients that hold state).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOAL_MEMORY_BYTES = 8 * 2**30
GOAL_ROUND_RATIO = 1.2


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(args: argparse.Namespace, num_clients: int) -> dict[str, Any]:
    """One client count, in this process."""
    import torch

    from peft_fed.engine import ClientStateStore
    from peft_fed.runtime.checkpoint import save_checkpoint
    from peft_fed.runtime.pipeline import FederatedRunConfig, load_run
    from peft_fed.runtime.trainer import FederatedTrainer
    from peft_fed.state import ClientState

    workdir = Path(tempfile.mkdtemp(prefix=f"memory-clients-{num_clients}-"))
    result: dict[str, Any] = {"num_clients": num_clients, "peak_rss_bytes_at_start": peak_rss_bytes()}
    config = FederatedRunConfig.from_dict(dict(
        method="fedsmoothlora", num_clients=num_clients, clients_per_round=args.clients_per_round,
        num_rounds=args.num_rounds, local_steps=args.local_steps, num_gradient_batches=args.local_steps,
        per_device_train_batch_size=args.batch_size, max_length=args.max_length, partition="iid", eval_every=0,
        dataset_kwargs={"samples_per_category": args.samples_per_category}, max_eval_samples=16,
        max_train_samples=num_clients * args.rows_per_client if args.rows_per_client else None,
        disable_tqdm=True, report_to="none", use_cpu=True, overwrite_output_dir=True, output_dir=str(workdir / "run"),
    ))  # fmt: skip
    tic = time.perf_counter()
    run = load_run(config, tokenize_eval=False)
    result["load_and_tokenise_seconds"] = time.perf_counter() - tic
    result["client_train_rows"] = sum(len(d) for d in run.client_train)
    trainer = FederatedTrainer(model=run.model, args=config.training_args, client_datasets=run.client_train,
                               eval_dataset=None, **run.trainer_kwargs())  # fmt: skip
    trainer.prepare_output_dir()
    budget = None if args.memory_budget_mib is None else int(args.memory_budget_mib * 2**20)
    engine = trainer.engine
    engine.client_states = ClientStateStore(engine.client_states, memory_budget_bytes=budget, spill_dir=workdir / "spill")
    result["peak_rss_bytes_before_rounds"] = peak_rss_bytes()

    round_seconds: list[float] = []
    play_round = engine.play_round

    def timed_round(round_index: int) -> dict[str, Any]:
        tic = time.perf_counter()
        row = play_round(round_index)
        round_seconds.append(time.perf_counter() - tic)
        return row

    engine.play_round = timed_round
    trainer.train()
    store = engine.client_states
    result["peak_rss_bytes_after_rounds"] = peak_rss_bytes()
    result["round_seconds"] = round_seconds
    result["median_round_seconds_after_first"] = statistics.median(round_seconds[1:] or round_seconds)
    result["clients_trained"] = sum(store[c].last_round is not None for c in store)
    # what a round's time depends on besides the client count: the sampled clients that trained before (FedSmoothLoRA
    # then computes D_c over the updates they missed), and where the time went
    seen: dict[str, int] = {}
    returning, missed = [], []
    for row in trainer.history:
        back = [c for c in row["clients"] if c in seen]
        returning.append(len(back))
        missed.append(sum(row["round"] - 1 - seen[c] for c in back))
        seen.update({c: row["round"] for c in row["clients"]})
    result["returning_clients_per_round"] = returning
    result["missed_rounds_of_returning_clients_per_round"] = missed
    result["init_seconds_per_round"] = [row["init_seconds"] for row in trainer.history]
    result["local_train_seconds_per_round"] = [row["local_train_seconds"] for row in trainer.history]
    # the round less its clients' execution: sampling, configuring, reading and writing client states, aggregation
    result["engine_seconds_per_round"] = [
        seconds - row["round_local_wall_seconds"] for seconds, row in zip(round_seconds, trainer.history, strict=True)
    ]
    result["model_bytes"] = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    result["n_model_copies_bytes"] = num_clients * result["model_bytes"]

    if args.fill_all:
        template = next(store[c] for c in store if store[c].nbytes)
        generator = torch.Generator().manual_seed(0)
        for cid in list(store):
            if store[cid].last_round is None:  # the shapes and dtypes of a trained client's state, random values
                store[cid] = ClientState(
                    cid, last_round=0, backbone_version=0,
                    layers={n: {k: torch.randn(t.shape, generator=generator).to(t.dtype) for k, t in ts.items()}
                            for n, ts in template.layers.items()},
                    extras={k: torch.randn(t.shape, generator=generator).to(t.dtype) for k, t in template.extras.items()},
                )  # fmt: skip
        result["peak_rss_bytes_every_client_with_state"] = peak_rss_bytes()
        result["client_state_bytes_per_client"] = template.nbytes
        result["client_state_bytes_total"] = template.nbytes * num_clients
        result["clients_spilled"] = len(store.spilled_clients)
        result["resident_client_state_bytes"] = store.resident_bytes
        tic = time.perf_counter()
        save_checkpoint(workdir / "run", args.num_rounds, engine.server_state, store, trainer.original_weights, {})
        result["checkpoint_seconds_every_client_with_state"] = time.perf_counter() - tic
        result["peak_rss_bytes_after_checkpoint"] = peak_rss_bytes()
    shutil.rmtree(workdir, ignore_errors=True)  # the run, its checkpoint and the spill files: 0.6 GB at 1,000 clients
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--clients_per_round", type=int, default=10)
    parser.add_argument("--num_rounds", type=int, default=4)
    parser.add_argument("--local_steps", type=int, default=2, help="Local steps and gradient-estimate batches.")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--samples_per_category", type=int, default=1000,
                        help="WordNet MC size: 16 categories x this many items (12,800 training rows at 1000).")  # fmt: skip
    parser.add_argument("--rows_per_client", type=int, default=None,
                        help="Use num_clients x this many training rows (the same data per client at every count).")
    parser.add_argument("--memory_budget_mib", type=float, default=4.0,
                        help="Resident client-state tensors, MiB (small, so that the runs spill).")  # fmt: skip
    parser.add_argument("--fill_all", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--output", default="benchmarks/results/memory_clients.json")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: measure one client count
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args, args.one)))
        return

    runs = []
    forwarded = sys.argv[1:]
    for n in args.num_clients:
        child = subprocess.run([sys.executable, __file__, *forwarded, "--one", str(n)], capture_output=True, text=True)
        if child.returncode:
            sys.exit(f"the run with {n} clients failed:\n{child.stderr[-4000:]}")
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    fewest = min(runs, key=lambda r: r["num_clients"])
    for r in runs:
        r["round_seconds_ratio_to_fewest_clients"] = r["median_round_seconds_after_first"] / fewest["median_round_seconds_after_first"]
        peak = max(v for k, v in r.items() if k.startswith("peak_rss_bytes"))
        r["peak_rss_bytes"] = peak
        r["memory_goal_reached"] = peak <= GOAL_MEMORY_BYTES
        r["round_time_goal_reached"] = r["round_seconds_ratio_to_fewest_clients"] <= GOAL_ROUND_RATIO
    result = {
        "command": "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/memory_clients.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("one", "output")},
        "load_average_at_end": os.getloadavg(),
        "goals": {"peak_rss_bytes": GOAL_MEMORY_BYTES, "round_seconds_ratio": GOAL_ROUND_RATIO},
        "runs": runs,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
