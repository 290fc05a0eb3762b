"""Choose GAUSS's defaults without any real scene's reference (issue 17, item 3).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/unmixing_defaults.py \\
        --real ../shared/datasets/hyperspectral/moffett,../shared/datasets/hyperspectral/samson,../shared/datasets/hyperspectral/jasper \\
        --output_dir benchmarks/results/unmixing/defaults_selection --workers 2

The protocol, fixed before it was run:

1. **Generated scenes, scored against their known truth** (phase 1). Every candidate (a combination of the
   open settings, :data:`CANDIDATES`) trains GAUSS_blind (whose stage 1 is GAUSS) with one seed on each scene of
   :data:`DEVELOPMENT_SCENES` (``peft_fed.unmixing.synthetic``: p = 3 and 4, with and without pure pixels,
   25-40 dB). A candidate's score is the mean over scenes of ``(SAD / SAD_default + aRMSE / aRMSE_default) / 2``
   of its GAUSS_blind result, relative to the previous defaults on the same scene, so every scene weighs the
   same; lower is better.
2. **Real cubes, reference-free criteria only** (phase 2). The ``--finalists`` best candidates of phase 1 train
   GAUSS_blind with seeds 0 and 1 on each real cube; only the cube and the number of endmembers are read (no
   reference endmember or abundance is loaded into the comparison). Criteria: the disagreement of the two
   seeds' endmembers (mean SAD after Hungarian matching: a setting whose endmembers move from seed to seed fits
   noise) and the reconstruction RMSE of the cube.
3. **Rule**: the phase-1 winner becomes the default, unless its mean seed disagreement on the real cubes is more
   than twice another finalist's; then the finalist with the lowest disagreement is taken.

Writes ``phase1.json``, ``phase2.json``, ``selection.json`` (the choice and why) and ``summary.md``; every
finished run is also appended to ``runs.jsonl`` as it ends, and a rerun into the same folder with the same
schedule reuses those runs instead of training them again.

Rounds (``--round``): **1** (default) are the first candidates, every combination of k-means features, the
blind stage's volume pull and early stopping, scored against the defaults before issue 17 (``raw_volume0``).
**2** changes one of the choices the first round left unexamined at a time, from the defaults round 1 chose
(``current_defaults``, pinned in :data:`ROUND2_REFERENCE` so the round does not move when a default does):
k-means with 2 or 3 clusters per endmember merged back to p by spectral angle, the AN's window 1 or 5, the
blind stage's learning rate x0.3 or x3 and its length x0.5 or x2 (of ``--blind_steps``). Same phases, same
rule; scores are relative to ``current_defaults``. ``--candidates`` runs a subset (the round's reference always
runs), e.g. the learning-rate rows again at a longer schedule. **3** scores the blind stage with the MN frozen
(``blind_freeze_mixing``: the UN is refitted to stage 1's endmembers, which cannot drift) against the defaults.
**4** scores GAUSS_prime's pseudo ground truth, FCLSU on VCA's endmembers (the default) or on N-FINDR's: its
candidates train and are scored as GAUSS_prime, in both phases. Both written before they ran, with the same
phases, score and rule.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

try:
    import peft_fed  # noqa: F401
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft_fed.unmixing.config import GaussConfig, GaussTrainingConfig  # noqa: E402
from peft_fed.unmixing.data import load_scene  # noqa: E402
from peft_fed.unmixing.metrics import evaluate_unmixing, match_endmembers, spectral_angle  # noqa: E402
from peft_fed.unmixing.synthetic import SyntheticSceneConfig, generate_scene  # noqa: E402
from peft_fed.unmixing.train import fit_gauss  # noqa: E402

MISICNET_VOLUME_WEIGHT = 2 * 100.0 * 3 / (95 * 95)
"""MiSiCNet's lambda = 100 on a 95 x 95 image with p = 3, in the units of ``blind_volume_weight`` (per pixel
and band, against an MSE): the one non-zero level tried, taken from the paper rather than tuned here."""

CANDIDATES = {
    f"{features}_volume{volume:.3g}{'_early_stop' if holdout else ''}": {
        "kmeans_features": features,
        "blind_volume_weight": volume,
        "blind_holdout_fraction": holdout,
        "blind_learning_rate": 3e-4,  # the default when round 1 ran, pinned so round 1 reproduces whatever the default
    }
    for features in ("raw", "normalized")
    for volume in (0.0, MISICNET_VOLUME_WEIGHT)
    for holdout in (0.0, 0.1)
}
PREVIOUS_DEFAULTS = "raw_volume0"

ROUND2_REFERENCE = {
    "kmeans_features": "raw",
    "blind_volume_weight": 0.0,
    "blind_holdout_fraction": 0.1,
    "kmeans_clusters_per_endmember": 1,
    "window_size": 3,
    "blind_learning_rate": 3e-4,
    "blind_steps_factor": 1.0,
}
"""The defaults chosen by round 1, written out: round 2's reference and the start of each of its candidates."""

ROUND2_CANDIDATES = {
    "current_defaults": dict(ROUND2_REFERENCE),
    **{
        name: {**ROUND2_REFERENCE, key: value}
        for name, key, value in (
            ("kmeans_clusters_per_endmember2", "kmeans_clusters_per_endmember", 2),
            ("kmeans_clusters_per_endmember3", "kmeans_clusters_per_endmember", 3),
            ("window1", "window_size", 1),
            ("window5", "window_size", 5),
            ("blind_lr_x0.3", "blind_learning_rate", 0.3 * ROUND2_REFERENCE["blind_learning_rate"]),
            ("blind_lr_x3", "blind_learning_rate", 3.0 * ROUND2_REFERENCE["blind_learning_rate"]),
            ("blind_length_x0.5", "blind_steps_factor", 0.5),
            ("blind_length_x2", "blind_steps_factor", 2.0),
        )
    },
}

ROUND3_CANDIDATES = {
    "current_defaults": dict(ROUND2_REFERENCE),
    "blind_freeze_mixing": {**ROUND2_REFERENCE, "blind_freeze_mixing": True},
}
"""Round 3, the blind stage's drift: joined UN and MN (the defaults) against the UN alone refitted to stage 1's
fixed MN, which cannot move the endmembers."""

ROUND4_CANDIDATES = {
    "prime_vca": {**ROUND2_REFERENCE, "prime_extractor": "vca"},
    "prime_nfindr": {**ROUND2_REFERENCE, "prime_extractor": "nfindr"},
}
"""Round 4, GAUSS_prime's pseudo ground truth: FCLSU on VCA's endmembers (the default since GAUSS_prime was
built, picked as the most widely used, never scored) against FCLSU on N-FINDR's."""

ROUNDS = {
    1: (CANDIDATES, PREVIOUS_DEFAULTS, "gauss_blind"),
    2: (ROUND2_CANDIDATES, "current_defaults", "gauss_blind"),
    3: (ROUND3_CANDIDATES, "current_defaults", "gauss_blind"),
    4: (ROUND4_CANDIDATES, "prime_vca", "gauss_prime"),
}
"""Per round: the candidates, the one every score is relative to, and the GAUSS variant that is trained and
scored (GAUSS_blind's runs also record its stage 1, which is GAUSS)."""

_MODEL_FIELDS = ("window_size",)

DEVELOPMENT_SCENES = {
    "p3_pure_30db": SyntheticSceneConfig(rows=48, cols=48, num_endmembers=3, snr_db=30.0, pure_pixels=True, seed=1),
    "p3_nopure_30db": SyntheticSceneConfig(rows=48, cols=48, num_endmembers=3, snr_db=30.0, pure_pixels=False, seed=2),
    "p4_pure_40db": SyntheticSceneConfig(rows=48, cols=48, num_endmembers=4, snr_db=40.0, pure_pixels=True, seed=3),
    "p4_nopure_25db": SyntheticSceneConfig(rows=48, cols=48, num_endmembers=4, snr_db=25.0, pure_pixels=False, seed=4),
}


def _settings(candidate: str, args: argparse.Namespace) -> dict:
    return ROUNDS[args.round][0][candidate]


def _training(candidate: str, seed: int, args: argparse.Namespace) -> GaussTrainingConfig:
    settings = {k: v for k, v in _settings(candidate, args).items() if k not in _MODEL_FIELDS}
    factor = settings.pop("blind_steps_factor", 1.0)
    return GaussTrainingConfig(
        stage1_steps=args.stage1_steps,
        blind_steps=int(round(factor * args.blind_steps)),
        seed=seed,
        show_progress=False,
        **settings,
    )


def _model(candidate: str, bands: int, num_endmembers: int, args: argparse.Namespace) -> GaussConfig:
    settings = {k: v for k, v in _settings(candidate, args).items() if k in _MODEL_FIELDS}
    return GaussConfig(num_bands=bands, num_endmembers=num_endmembers, **settings)


def _generated_job(candidate: str, scene_name: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        scene = generate_scene(DEVELOPMENT_SCENES[scene_name])
        start = time.perf_counter()
        p = scene.num_reference_endmembers
        model = _model(candidate, scene.cube.shape[-1], p, args)
        variant = ROUNDS[args.round][2]
        fitted = fit_gauss(scene.cube, p, variant, model, _training(candidate, 0, args))
        wall = time.perf_counter() - start
    record = {"candidate": candidate, "scene": scene_name, "wall_time_s": wall}
    outputs = {variant: (fitted.endmembers, fitted.abundances, fitted.reconstruction)}
    if fitted.stage1 is not None:
        outputs["gauss"] = (fitted.stage1["endmembers"], fitted.stage1["abundances"], fitted.stage1["reconstruction"])
    for output_name, (endmembers, abundances, reconstruction) in outputs.items():
        metrics = evaluate_unmixing(
            endmembers, abundances, scene.endmembers, scene.abundances, cube=scene.cube, reconstruction=reconstruction
        )
        record[output_name] = {
            "sad_mean": metrics.sad_mean,
            "armse": metrics.armse,
            "reconstruction_rmse": metrics.reconstruction_rmse,
        }
    print(json.dumps(record), flush=True)
    return record


def _real_job(candidate: str, folder: str, seed: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    scene = load_scene(folder)
    # Only the cube and the number of endmembers go further: the references stay out of the selection.
    cube, num_endmembers = scene.cube, scene.num_reference_endmembers
    with threadpool_limits(limits=1):
        start = time.perf_counter()
        model = _model(candidate, cube.shape[-1], num_endmembers, args)
        fitted = fit_gauss(cube, num_endmembers, ROUNDS[args.round][2], model, _training(candidate, seed, args))
        wall = time.perf_counter() - start
    reconstruction_rmse = float(np.sqrt(np.mean((fitted.reconstruction - cube) ** 2)))
    record = {
        "candidate": candidate,
        "scene": scene.name,
        "seed": seed,
        "wall_time_s": wall,
        "reconstruction_rmse": reconstruction_rmse,
        "endmembers": fitted.endmembers.tolist(),
    }
    print(json.dumps({key: value for key, value in record.items() if key != "endmembers"}), flush=True)
    return record


def seed_disagreement(first: np.ndarray, second: np.ndarray) -> float:
    """Mean spectral angle (rad) between two runs' endmembers ``(bands, p)`` after Hungarian matching."""
    order = match_endmembers(second, first)
    return float(np.mean([spectral_angle(second[:, order[k]], first[:, k]) for k in range(first.shape[1])]))


def phase1_scores(
    records: list[dict], reference: str = PREVIOUS_DEFAULTS, variant: str = "gauss_blind"
) -> dict[str, float]:
    """Each candidate's mean over scenes of ``(SAD / SAD_ref + aRMSE / aRMSE_ref) / 2`` (of the GAUSS ``variant``),
    relative to the ``reference`` candidate on the same scene."""
    by_key = {(record["candidate"], record["scene"]): record[variant] for record in records}
    scenes = sorted({record["scene"] for record in records})
    candidates = sorted({record["candidate"] for record in records})
    scores = {}
    for candidate in candidates:
        ratios = []
        for scene in scenes:
            own, previous = by_key[(candidate, scene)], by_key[(reference, scene)]
            ratios.append(0.5 * (own["sad_mean"] / previous["sad_mean"] + own["armse"] / previous["armse"]))
        scores[candidate] = float(np.mean(ratios))
    return scores


def choose(scores: dict[str, float], disagreements: dict[str, float]) -> tuple[str, str]:
    """The rule of step 3: the phase-1 winner unless its seed disagreement exceeds twice another finalist's."""
    finalists = sorted(disagreements, key=lambda name: scores[name])
    winner = finalists[0]
    steadiest = min(finalists, key=lambda name: disagreements[name])
    if disagreements[winner] > 2 * disagreements[steadiest]:
        return steadiest, (
            f"{winner} scored best on the generated scenes but its endmembers disagree across seeds on the real "
            f"cubes {disagreements[winner]:.4f} rad against {disagreements[steadiest]:.4f}"
        )
    return winner, (
        f"best on the generated scenes (score {scores[winner]:.4f}); seed disagreement on the real cubes "
        f"{disagreements[winner]:.4f} rad, within twice the steadiest finalist's ({disagreements[steadiest]:.4f})"
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", default="", help="comma-separated Samson-like scene folders (cubes only are read)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--stage1_steps", type=int, default=1500)
    parser.add_argument("--blind_steps", type=int, default=1000)
    parser.add_argument("--finalists", type=int, default=2, help="phase-1 candidates taken to the real cubes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--round", type=int, choices=sorted(ROUNDS), default=1, help="candidate set (see above)")
    parser.add_argument(
        "--candidates",
        default="",
        help="comma-separated subset of the round's candidates (its reference is always run); default: all",
    )
    return parser.parse_args(argv)


def _job_key(record: dict) -> tuple:
    return (record["candidate"], record["scene"], record.get("seed", 0), record["stage1_steps"], record["blind_steps"])


class _RunLog:
    """``runs.jsonl``: every finished run, appended as it ends; runs of the same candidate, scene, seed and
    schedule found there are reused by a rerun into the same folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reused = 0
        self.done = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.done[_job_key(record)] = record

    def run(self, pool, jobs: list[tuple], function, args: argparse.Namespace) -> list[dict]:
        keys = [
            (job[0], Path(job[1]).name, job[2] if len(job) > 2 else 0, args.stage1_steps, args.blind_steps)
            for job in jobs
        ]
        futures = {
            key: pool.submit(function, *job, args) for key, job in zip(keys, jobs, strict=True) if key not in self.done
        }
        records = []
        for key in keys:
            if key in futures:
                record = {**futures[key].result(), "stage1_steps": args.stage1_steps, "blind_steps": args.blind_steps}
                with self.path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                self.done[key] = record
            else:
                self.reused += 1
            records.append(self.done[key])
        return records


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    candidates, reference, variant = ROUNDS[args.round]
    if args.candidates:
        names = [name for name in args.candidates.split(",") if name]
        unknown = sorted(set(names) - set(candidates))
        if unknown:
            raise SystemExit(f"unknown candidates of round {args.round}: {', '.join(unknown)}")
        candidates = {name: settings for name, settings in candidates.items() if name == reference or name in names}
    log = _RunLog(output_dir / "runs.jsonl")
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [(candidate, scene) for candidate in candidates for scene in DEVELOPMENT_SCENES]
        phase1 = log.run(pool, jobs, _generated_job, args)
        scores = phase1_scores(phase1, reference, variant)
        (output_dir / "phase1.json").write_text(json.dumps({"command": command, "scores": scores, "runs": phase1}, indent=2))
        finalists = sorted(scores, key=scores.get)[: args.finalists]
        folders = [folder for folder in args.real.split(",") if folder]
        real_jobs = [(c, folder, seed) for c in finalists for folder in folders for seed in (0, 1)]
        phase2 = log.run(pool, real_jobs, _real_job, args)
    per_scene: dict[str, dict[str, dict]] = {}
    for candidate in finalists:
        for folder in folders:
            runs = [r for r in phase2 if r["candidate"] == candidate and r["scene"] == Path(folder).name]
            per_scene.setdefault(candidate, {})[Path(folder).name] = {
                "seed_disagreement_rad": seed_disagreement(np.array(runs[0]["endmembers"]), np.array(runs[1]["endmembers"])),
                "reconstruction_rmse": float(np.mean([r["reconstruction_rmse"] for r in runs])),
            }
    disagreements = {
        candidate: float(np.mean([value["seed_disagreement_rad"] for value in scenes.values()]))
        for candidate, scenes in per_scene.items()
    }
    chosen, reason = choose(scores, disagreements) if disagreements else (finalists[0], "no real cube given")
    wall = time.perf_counter() - start
    (output_dir / "phase2.json").write_text(
        json.dumps({"command": command, "per_scene": per_scene, "disagreement": disagreements, "runs": phase2}, indent=2)
    )
    selection = {
        "command": command,
        "round": args.round,
        "reference": reference,
        "variant": variant,
        "chosen": chosen,
        "settings": candidates[chosen],
        "reason": reason,
        "wall_time_s": wall,
        "runs_reused_from_runs_jsonl": log.reused,
        "summed_run_wall_time_s": float(sum(r["wall_time_s"] for r in phase1 + phase2)),
    }
    (output_dir / "selection.json").write_text(json.dumps(selection, indent=2))
    (output_dir / "summary.md").write_text(_markdown(phase1, scores, per_scene, disagreements, selection))
    print(json.dumps(selection, indent=2))
    return 0


def _markdown(phase1, scores, per_scene, disagreements, selection) -> str:
    scenes = list(DEVELOPMENT_SCENES)
    variant = selection["variant"]
    by_key = {(r["candidate"], r["scene"]): r for r in phase1}
    with_stage1 = all("gauss" in record for record in phase1)
    lines = [
        f"Command: `{selection['command']}`; wall time {selection['wall_time_s']:.0f} s.",
        "",
        f"Phase 1, generated scenes: {variant} mean SAD (rad) / aRMSE per scene"
        + (", GAUSS (its stage 1) mean SAD" if with_stage1 else "")
        + ", score",
        "",
        "| candidate | " + " | ".join(scenes) + (" | GAUSS SAD, mean over scenes" if with_stage1 else "") + " | score |",
        "|---|" + "---|" * (len(scenes) + 1 + with_stage1),
    ]
    for candidate in sorted(scores, key=scores.get):
        cells = [
            f"{by_key[(candidate, s)][variant]['sad_mean']:.4f} / {by_key[(candidate, s)][variant]['armse']:.4f}"
            for s in scenes
        ]
        if with_stage1:
            cells.append(f"{np.mean([by_key[(candidate, s)]['gauss']['sad_mean'] for s in scenes]):.4f}")
        lines.append(f"| {candidate} | " + " | ".join(cells) + f" | {scores[candidate]:.4f} |")
    lines += ["", "Phase 2, real cubes (no reference): seed disagreement (rad) / reconstruction RMSE", ""]
    for candidate, scenes_of in per_scene.items():
        cells = ", ".join(
            f"{name} {value['seed_disagreement_rad']:.4f} / {value['reconstruction_rmse']:.4f}" for name, value in scenes_of.items()
        )
        lines.append(f"- {candidate}: {cells}; mean disagreement {disagreements[candidate]:.4f}")
    lines += ["", f"Chosen: **{selection['chosen']}** ({selection['reason']})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
