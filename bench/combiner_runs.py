"""Train the five configs/combiners/*.yaml runs and tabulate what each combiner did.

    python bench/combiner_runs.py                 # 200 RL steps each (about 2.5 min per run here)
    python bench/combiner_runs.py --steps 50 --only mgda pcgrad

The runs are identical except for the ``combiner:`` block (same seed, data, SFT warm start). For
each one: reward, entropy and KL over the first and last 10 RL steps, the last validation accuracy,
how often the objectives' gradients conflicted, the mean coefficients and the wall time.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mean(rows: list[dict[str, str]], key: str) -> float:
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return statistics.fmean(vals) if vals else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="RL steps per run")
    p.add_argument("--only", nargs="*", help="config names (default: all five)")
    p.add_argument("--out", default="runs", help="log directory")
    p.add_argument("--space", choices=("params", "hidden", "logits"), help="override model.gradients.space")
    args = p.parse_args()
    configs = sorted(glob.glob(os.path.join(ROOT, "configs", "combiners", "*.yaml")))
    configs = [c for c in configs if os.path.basename(c) != "peers.yaml"]  # the shared layer, not a combiner
    configs = [c for c in configs if not args.only or os.path.basename(c)[:-5] in args.only]
    header = (
        f"{'combiner':>10} {'reward':>13} {'entropy':>13} {'KL (k3)':>13} {'val acc':>7} {'conflict':>8} "
        f"{'c_policy':>8} {'c_entropy':>9} {'c_kl':>7} {'time':>6}"
    )
    lines = []
    for cfg in configs:
        name = os.path.basename(cfg)[:-5]
        run_name = f"combiner_runs/{args.space or 'config'}/{name}"
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable, os.path.join(ROOT, "cli.py"), "fit", "--config", cfg,
                f"--data.steps_per_epoch={args.steps}", f"--trainer.logger.init_args.save_dir={args.out}",
                f"--trainer.logger.init_args.name={run_name}", "--trainer.enable_progress_bar=false",
                *([f"--model.gradients.space={args.space}"] if args.space else []),
            ],
            check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        log_dir = sorted(glob.glob(os.path.join(ROOT, args.out, run_name, "version_*")), key=os.path.getmtime)[-1]
        with open(os.path.join(log_dir, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
        train = [r for r in rows if r.get("train/reward/mean")]
        val = [r for r in rows if r.get("val/accuracy")]
        first, last = train[:10], train[-10:]

        def span(key: str, first=first, last=last) -> str:
            return f"{_mean(first, key):.3f}->{_mean(last, key):.3f}"

        lines.append(
            f"{name:>10} {span('train/reward/mean'):>13} {span('train/policy/entropy'):>13} "
            f"{span('train/policy/kl_ref'):>13} {float(val[-1]['val/accuracy']):>7.3f} "
            f"{_mean(train, 'train/grad/conflict'):>8.2f} {_mean(train, 'train/combiner/c_policy'):>8.3f} "
            f"{_mean(train, 'train/combiner/c_entropy'):>9.4f} {_mean(train, 'train/combiner/c_kl'):>7.4f} "
            f"{wall:>5.0f}s"
        )
        print(lines[-1], flush=True)
    print(
        f"\nspace={args.space or 'as configured'} steps={args.steps}; first->last: mean of the first and last "
        "10 RL steps; conflict: fraction of "
        "updates with a pair of gradients at cosine < 0 (in the Gram space); c_*: mean coefficient"
    )
    print(header)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
