"""Deployment against simulation, measured in one run: the same rounds of the default MiniLM setting, once
simulated in one process (``FederatedTrainer``) and once on a local Flower deployment (a SuperLink and one SuperNode
per client on loopback, TLS and SuperNode authentication), with the wall time per round and the bytes on the wire.

    python benchmarks/deployment.py                       # 3 clients, all sampled, 2 rounds (about 10 minutes)
    python benchmarks/deployment.py --num_clients 3 --num_rounds 3 --method fedit

Writes ``benchmarks/results/deployment/<method>.json`` (docs/deployment.md cites it): per round, the simulated and
deployed wall seconds and their ratio, and ``downlink_wire_bytes``/``uplink_wire_bytes`` (Flower's serialised
messages) against ``downlink_bytes``/``uplink_bytes`` (the tensors, ``Broadcast.nbytes``/``Upload.nbytes``). The
two runs must also end in the same state (checked, reported as ``max_abs_difference``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _round_seconds(row: dict) -> float:
    return float(row["round_local_wall_seconds"] + row["aggregation_seconds"] + (row.get("eval_seconds") or 0.0))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="fedsmoothlora")
    parser.add_argument("--num_clients", type=int, default=3)
    parser.add_argument("--num_rounds", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "deployment"))
    args = parser.parse_args(argv)

    from peft_fed.flower.local import APP_DIR, LocalDeployment
    from peft_fed.runtime.checkpoint import latest_checkpoint, load_checkpoint
    from peft_fed.runtime.pipeline import run_federated

    work = Path(tempfile.mkdtemp(prefix="peft-fed-deploy-bench-"))
    settings = dict(method=args.method, num_clients=args.num_clients, clients_per_round=args.num_clients,
                    num_rounds=args.num_rounds, save_every=1, disable_tqdm=True)  # fmt: skip

    tic = time.perf_counter()
    simulated = run_federated(dict(settings, output_dir=str(work / "simulated")))
    simulated_seconds = time.perf_counter() - tic

    config = work / "run.yaml"
    config.write_text(yaml.safe_dump(dict(settings, output_dir=str(work / "deployed"))))
    tic = time.perf_counter()
    with LocalDeployment(work / "flower", args.num_clients) as deployment:
        started = time.perf_counter() - tic
        deployment.run(APP_DIR, {"config": str(config), "node_wait": 300}, timeout=3600)
    deployed_seconds = time.perf_counter() - tic
    deployed = [json.loads(line) for line in (work / "deployed" / "metrics.jsonl").read_text().splitlines()]

    a = load_checkpoint(latest_checkpoint(work / "simulated"))
    b = load_checkpoint(latest_checkpoint(work / "deployed"))
    ours, _ = b.server_state.state_dict()
    theirs, _ = a.server_state.state_dict()
    difference = max([float((ours[k] - theirs[k]).abs().max()) for k in theirs] +
                     [float((b.backbone[k] - a.backbone[k]).abs().max()) for k in a.backbone])  # fmt: skip

    rounds = []
    for sim, dep in zip(simulated.history, deployed, strict=True):
        rounds.append({
            "round": sim["round"],
            "simulated_seconds": _round_seconds(sim),
            "deployed_seconds": _round_seconds(dep),
            "ratio": _round_seconds(dep) / _round_seconds(sim),
            "downlink_bytes": dep["downlink_bytes"],
            "downlink_wire_bytes": dep["downlink_wire_bytes"],
            "uplink_bytes": dep["uplink_bytes"],
            "uplink_wire_bytes": dep["uplink_wire_bytes"],
        })  # fmt: skip
    result = {
        "command": "python benchmarks/deployment.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": settings,
        "model": "all-MiniLM-L6-v2 (default)",
        "dataset": "wordnet_mc (default)",
        "deployment": "loopback, TLS + SuperNode authentication, one SuperNode per client, flwr 1.42.0",
        "rounds": rounds,
        "mean_round_ratio": sum(r["ratio"] for r in rounds) / len(rounds),
        "simulated_total_seconds": simulated_seconds,
        "deployed_total_seconds": deployed_seconds,
        "deployment_startup_seconds": started,
        "max_abs_difference": difference,
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.method}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
