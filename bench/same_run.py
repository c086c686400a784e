"""Does a refactor change what a seeded run does? Runs each config at a git revision and in this tree.

    .venv/bin/python bench/same_run.py --before 3500aca            # grpo, cappo, erc, dppo_topk, 4 steps
    .venv/bin/python bench/same_run.py --before HEAD~3 --configs grpo --steps 2

For each config: ``cli.py fit`` for ``--steps`` RL steps (validation every 2 steps, so the SRR and
the validation sampler run too) in a git worktree of ``--before`` and in this working tree, each in
its own process, both from one shared SFT cache. Then it compares, bit for bit, the final weights
(policy, and critic where there is one) and every logged metric but the timings. Prints one line per
config and exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("time", "per_s", "throughput", "seconds")

# Runs inside the tree under test (its own ``cappo_pl`` first on sys.path): fit, then save the weights.
RUNNER = """
import sys, torch
from cappo_pl.cli import build_cli
out, args = sys.argv[1], sys.argv[2:]
cli = build_cli(args, run=False)
cli.trainer.fit(cli.model, cli.datamodule)
torch.save({k: v.detach().cpu() for k, v in cli.model.state_dict().items()}, out)
"""


def run(tree: Path, config: str, steps: int, out: Path, cache: Path) -> tuple[dict, list[dict]]:
    """Fit ``config`` in ``tree``; returns (state_dict, rows of metrics.csv)."""
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "weights.pt"
    args = [
        "fit", "--config", f"configs/{config}.yaml", f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
        "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={out}", "--trainer.logger.init_args.name=run",
        f"--model.policy.sft.cache_dir={cache}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(weights), *args[1:]], cwd=tree, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"{config} failed in {tree}:\n{proc.stderr[-3000:]}")
    import torch

    rows = list(csv.DictReader(open(next(out.rglob("metrics.csv")))))
    return torch.load(weights), rows


def compare(before: tuple[dict, list[dict]], after: tuple[dict, list[dict]]) -> list[str]:
    """What differs between two runs (empty: bit-identical weights and metrics)."""
    import torch

    (w0, m0), (w1, m1) = before, after
    diffs = []
    if w0.keys() != w1.keys():
        diffs.append(f"weight keys differ: {sorted(w0.keys() ^ w1.keys())[:4]}")
    for k in w0.keys() & w1.keys():
        if not torch.equal(w0[k], w1[k]):
            diffs.append(f"weight {k}: max |diff| {float((w0[k].float() - w1[k].float()).abs().max()):.3g}")
    keys0 = {k for row in m0 for k, v in row.items() if v != ""}
    keys1 = {k for row in m1 for k, v in row.items() if v != ""}
    if keys0 != keys1:
        diffs.append(f"metric keys: only before {sorted(keys0 - keys1)}, only after {sorted(keys1 - keys0)}")
    if len(m0) != len(m1):
        diffs.append(f"metrics.csv rows: {len(m0)} vs {len(m1)}")
    for r0, r1 in zip(m0, m1, strict=False):
        for k in sorted(keys0 & keys1):
            if not any(t in k for t in TIMING) and r0.get(k, "") != r1.get(k, ""):
                diffs.append(f"{k} (step {r0.get('step')}): {r0.get(k)} vs {r1.get(k)}")
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision to compare this tree against")
    parser.add_argument("--configs", nargs="+", default=["grpo", "cappo", "erc", "dppo_topk"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "cappo_pl" / "sft"), help="shared SFT cache")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="same_run_"))
    old = work / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(old), opts.before], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    failed = False
    try:
        for config in opts.configs:
            before = run(old, config, opts.steps, work / "out_before" / config, Path(opts.cache))
            after = run(ROOT, config, opts.steps, work / "out_after" / config, Path(opts.cache))
            diffs = compare(before, after)
            n_metrics = len({k for row in after[1] for k, v in row.items() if v != ""})
            status = "identical" if not diffs else f"DIFFERS ({len(diffs)})"
            print(f"{config:12s} {opts.steps} steps: {len(after[0])} tensors, {n_metrics} metric keys: {status}")
            for d in diffs[:10]:
                print(f"    {d}")
            failed |= bool(diffs)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
