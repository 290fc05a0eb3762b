"""Memory of many simulated clients: one shared model plus per-client adapter state, not N models.

    python benchmarks/memory_clients.py --num_clients 50 --output benchmarks/results/memory_clients.json

Runs one FedSmoothLoRA round in which every client trains (1 local step) on the real all-MiniLM-L6-v2
(WordNet multiple choice), then reports the model's parameter bytes, the bytes of every client's kept
state, the process's peak RSS before and after the round, and what N model copies would take.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_clients", type=int, default=50)
    parser.add_argument("--output", default="benchmarks/results/memory_clients.json")
    parser.add_argument("--output_dir", default="runs/memory_clients")
    args = parser.parse_args()

    from peft_fed.runtime.pipeline import FederatedRunConfig, run_federated

    config = FederatedRunConfig.from_dict(dict(
        num_clients=args.num_clients, clients_per_round=args.num_clients, num_rounds=1, local_steps=1,
        per_device_train_batch_size=2, max_length=32, max_eval_samples=16, partition="iid", method="fedsmoothlora",
        num_gradient_batches=1, output_dir=args.output_dir,
    ))  # fmt: skip
    rss_before = peak_rss_bytes()
    started = time.perf_counter()
    captured = {}

    import peft_fed.runtime.trainer as trainer_module

    original_train = trainer_module.FederatedTrainer.train

    def train_and_capture(self, *a, **k):
        captured["rss_before_rounds"] = peak_rss_bytes()
        history = original_train(self, *a, **k)
        captured["model_bytes"] = sum(p.numel() * p.element_size() for p in self.model.parameters())
        captured["client_state_bytes"] = sum(s.nbytes for s in self.client_states.values())
        captured["clients_trained"] = sum(s.last_round is not None for s in self.client_states.values())
        captured["rss_after_rounds"] = peak_rss_bytes()
        return history

    trainer_module.FederatedTrainer.train = train_and_capture
    run_federated(config)
    n = args.num_clients
    result = {
        "command": f"python benchmarks/memory_clients.py --num_clients {n}",
        "num_clients": n,
        "clients_trained": captured["clients_trained"],
        "model_bytes": captured["model_bytes"],
        "client_state_bytes_total": captured["client_state_bytes"],
        "client_state_bytes_per_client": captured["client_state_bytes"] / n,
        "n_model_copies_bytes": n * captured["model_bytes"],
        "peak_rss_bytes_before_loading": rss_before,
        "peak_rss_bytes_before_rounds": captured["rss_before_rounds"],
        "peak_rss_bytes_after_rounds": captured["rss_after_rounds"],
        "seconds": time.perf_counter() - started,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
