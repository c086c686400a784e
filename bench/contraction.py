"""The contraction experiment: does GRPO lose the SFT policy's support, and does CaPPO keep it?

    python bench/contraction.py                      # 4 methods x 3 seeds x 200 RL steps (docs/cappo.md)
    python bench/contraction.py --steps 50 --seeds 0 --methods grpo cappo
    python bench/contraction.py --lab sum --methods grpo --out runs/lab_sum   # a lab task (configs/lab/)

Every run starts from the same SFT warm start of the built-in task (the seed changes sampling and
the prompt order, not the SFT policy) and validates every 50 RL steps (SRR over the 18 held-out
prompts' 216 SFT references; reward/accuracy by sampling). Writes, under ``--out``:

- ``metrics_long.csv``: tidy, one row per (method, seed, step, metric, value); ``step`` is the
  number of updates applied before the measurement (train metrics of RL step t are measured on
  its rollouts, before its update; ``val/*`` at step 0 is the initial policy);
- ``summary.csv`` and ``summary.md``: final reward, accuracy, SRR, entropy and KL, mean +- 95% CI
  (Student t) over seeds; ``configs/``: the exact config of every run.

With ``--lab sum`` or ``--lab path`` every run is layered with ``configs/lab/<lab>.yaml`` (its task, SFT
start and support metrics: ``val/exact/*``, ``val/hidden/*``, ``train_eval/*``; docs/lab.md).

``notebooks/contraction.ipynb`` plots these files.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

from cappo_pl.cli import merge_layers, merged_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# method -> (config, dotted overrides). All share the policy surrogate (PPO-clip, GRPO advantages), the
# k3 KL (0.04 in the loss), data, model, SFT start, optimizer and step count. ``callbacks.<Class>.<arg>``
# sets an init arg of that callback. The first four are the experiment; the rest are the variants
# docs/cappo.md reports (``--methods`` picks them).
_KL_BUDGET = {
    "class_path": "cappo_pl.callbacks.AdaptiveKLController",
    "init_args": {"objective": "kl", "init_coef": 0.04, "target": 0.2, "horizon": 10000, "gate": True},
}
_SCALARIZED = {"model.combiner": {"class_path": "cappo_pl.combiners.Scalarized"}, "model.gradients.space": "hidden"}
METHODS: dict[str, tuple[str, dict[str, object]]] = {
    "grpo": ("configs/grpo.yaml", {}),
    "grpo_entropy": ("configs/combiners/scalarized.yaml", {"model.gradients.space": "hidden"}),
    "cappo": ("configs/cappo.yaml", {}),
    "cappo_scalarized": ("configs/cappo.yaml", _SCALARIZED),
    # entropy targets below the SFT entropy: how much reward does retention cost?
    "cappo_target0.75": ("configs/cappo.yaml", {"callbacks.EntropyController.target_ratio": 0.75}),
    "cappo_target0.5": ("configs/cappo.yaml", {"callbacks.EntropyController.target_ratio": 0.5}),
    # the design decision: preference-scaled MGDA on raw gradients instead of l2-normalised ones
    "cappo_mgda_raw": ("configs/cappo.yaml", {"model.combiner.init_args.normalization": "none"}),
    # the KL term as a budget (a gated constraint, like the entropy floor) instead of an always-active peer
    "cappo_klbudget": ("configs/cappo.yaml", {"callbacks+": [_KL_BUDGET]}),
    "cappo_klbudget_target0.75": (
        "configs/cappo.yaml",
        {"callbacks+": [_KL_BUDGET], "callbacks.EntropyController.target_ratio": 0.75},
    ),
    # the scalarized ablation with a plain (ungated) PI controller
    "cappo_scalarized_nogate": ("configs/cappo.yaml", {**_SCALARIZED, "callbacks.EntropyController.gate": False}),
}
EXPERIMENT = ["grpo", "grpo_entropy", "cappo", "cappo_scalarized"]
# A small model and short SFT, for smoke runs and the notebook test (--tiny).
TINY = {
    "model.policy.tiny.hidden_size": 32,
    "model.policy.tiny.num_layers": 2,
    "model.policy.tiny.num_heads": 2,
    "model.policy.tiny.intermediate_size": 64,
    "model.policy.sft.steps": 30,
    "model.policy.sft.batch_size": 32,
    "model.policy.sft.eval_samples": 2,
    "data.prompts_per_step": 4,
    "model.rollout.group_size": 4,
    "model.val_samples": 2,
}
TRAIN_KEYS = (
    "train/reward/mean",
    "train/accuracy",
    "train/policy/entropy",
    "train/policy/kl_ref",
    "train/entropy_coef",
    "train/entropy_target",
    "train/objective/entropy/weight",
    "train/grad/combined_norm_ratio",
    "train/grad/cos_combined_policy",
    "train/combiner/c_policy",
    "train/combiner/c_entropy",
    "train/combiner/c_kl",
)
SUMMARY = (  # label, metric, how the final value is taken
    ("reward (train)", "train/reward/mean", "last10"),
    ("accuracy (val)", "val/accuracy", "last"),
    ("SRR@0.1 (val)", "val/srr", "last"),
    ("SRR@0.01 (val)", "val/srr@1e-02", "last"),
    ("SRR_rel (val)", "val/srr_rel", "last"),
    ("entropy", "train/policy/entropy", "last10"),
    ("KL to ref (k3)", "train/policy/kl_ref", "last10"),
    # the lab tasks' support metrics (absent elsewhere: n/a)
    ("exact pass@1 (val)", "val/exact/pass@1", "last"),
    ("coverage@64 (val)", "val/exact/coverage@64", "last"),
    ("hidden pass@8 (val)", "val/hidden/pass@8", "last"),
    ("exact pass@1 (train)", "train_eval/exact/pass@1", "last"),
    ("coverage@64 (train)", "train_eval/exact/coverage@64", "last"),
    ("hidden pass@8 (train)", "train_eval/hidden/pass@8", "last"),
)
LABS = ("sum", "path")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _set(cfg: dict, dotted: str, value: object) -> None:
    node = cfg
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def run_config(
    method: str, seed: int, steps: int, out: str, tiny: bool, sft_cache: str | None, lab: str | None = None
) -> str:
    """Write the run's config (logger under ``out``, no checkpoints or sample tables) and return its path."""
    path, overrides = METHODS[method]
    cfg = merged_config(os.path.join(ROOT, path))  # the base: layers folded in: a standalone file
    if lab is not None:  # the lab layer over the method, as `--config <method> --config configs/lab/<lab>.yaml`
        with open(os.path.join(ROOT, "configs", "lab", f"{lab}.yaml")) as f:
            own = yaml.safe_load(f)
        own.pop("base", None)  # base.yaml: already under the method
        cfg = merge_layers(cfg, own)
    cfg["trainer"]["callbacks"] = [
        cb
        for cb in cfg["trainer"].get("callbacks", [])
        if not cb["class_path"].endswith(("ModelCheckpoint", "SampleTable"))
    ]
    cfg["trainer"]["enable_checkpointing"] = False
    cfg["trainer"]["enable_progress_bar"] = False
    cfg["trainer"]["enable_model_summary"] = False
    cfg["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": os.path.join(out, "logs"), "name": method, "version": f"seed_{seed}"},
    }
    cfg["seed_everything"] = seed
    settings = {
        **overrides,
        **(TINY if tiny else {}),
        "model.seed": seed,
        "data.seed": seed,
        "data.steps_per_epoch": steps,
    }
    if sft_cache:
        settings["model.policy.sft.cache_dir"] = sft_cache
    for key, value in settings.items():
        if key == "callbacks+":
            cfg["trainer"]["callbacks"] += value
        elif key.startswith("callbacks."):
            _, cls, arg = key.split(".")
            (cb,) = [cb for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith("." + cls)]
            cb.setdefault("init_args", {})[arg] = value
        else:
            _set(cfg, key, value)
    dest = os.path.join(out, "configs", f"{method}_seed{seed}.yaml")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "w") as f:
        f.write(f"# python cli.py fit --config {dest}\n# written by bench/contraction.py from {path}\n")
        yaml.safe_dump(cfg, f, sort_keys=False)
    return dest


def _float(v: str | None) -> float | None:
    if v in (None, ""):
        return None
    x = float(v)
    return x if math.isfinite(x) else None


def tidy_rows(method: str, seed: int, metrics_csv: str) -> list[dict[str, object]]:
    """Long-format rows of one run's ``metrics.csv`` (see the module docstring for ``step``)."""
    out = []
    with open(metrics_csv) as f:
        for r in csv.DictReader(f):
            if _float(r.get("train/rl_step")) is not None:
                step = int(float(r["train/rl_step"]))
                keys = TRAIN_KEYS
            elif any(k.startswith(("val/", "train_eval/")) and _float(v) is not None for k, v in r.items()):
                # a validation after (step + 1) updates; the initial values (no val/accuracy) are step 0
                step = int(r["step"]) + 1 if _float(r.get("val/accuracy")) is not None else 0
                keys = tuple(k for k in r if k.startswith(("val/", "train_eval/")))
            else:
                continue
            for key in keys:
                value = _float(r.get(key))
                if value is not None:
                    out.append({"method": method, "seed": seed, "step": step, "metric": key, "value": value})
    return out


def final_value(rows: list[dict[str, object]], metric: str, how: str) -> float | None:
    """One run's final value: the mean of the last 10 RL steps, or the last measurement."""
    pts = sorted((r["step"], r["value"]) for r in rows if r["metric"] == metric)
    if not pts:
        return None
    if how == "last10":
        return statistics.fmean(v for _, v in pts[-10:])
    return pts[-1][1]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def summarise(rows: list[dict[str, object]], methods: list[str]) -> list[dict[str, object]]:
    """Per method and summary metric: mean, CI half-width, the per-seed values."""
    table = []
    for method in methods:
        runs = {}
        for r in rows:
            if r["method"] == method:
                runs.setdefault(r["seed"], []).append(r)
        for label, metric, how in SUMMARY:
            vals = [v for v in (final_value(rs, metric, how) for rs in runs.values()) if v is not None]
            start = [
                v for v in (final_value([r for r in rs if r["step"] == 0], metric, "last") for rs in runs.values())
            ]
            start = [v for v in start if v is not None]
            if vals:
                m, ci = mean_ci(vals)
                s = statistics.fmean(start) if start else float("nan")
                table.append({"method": method, "metric": label, "start": s, "mean": m, "ci95": ci, "seeds": len(vals)})
    return table


def tracking(rows: list[dict[str, object]], methods: list[str], start: int = 50) -> list[str]:
    """How closely the controlled runs hold their entropy target, from step ``start`` on."""
    lines = []
    for method in methods:
        for seed in sorted({r["seed"] for r in rows if r["method"] == method}):
            mine = [r for r in rows if r["method"] == method and r["seed"] == seed and r["step"] >= start]
            target = {r["step"]: r["value"] for r in mine if r["metric"] == "train/entropy_target"}
            pts = [(r["step"], r["value"] / target[r["step"]]) for r in mine
                   if r["metric"] == "train/policy/entropy" and r["step"] in target]  # fmt: skip
            if not pts:
                continue
            within = sum(abs(x - 1) <= 0.1 for _, x in pts) / len(pts)
            last = [x for _, x in pts[-10:]]
            lines.append(
                f"{method} seed {seed}: target {statistics.fmean(target.values()):.3f}; entropy within 10% of it in "
                f"{within:.0%} of steps >= {start}; last 10 steps mean H/H* = {statistics.fmean(last):.3f}"
            )
    return lines


def markdown(table: list[dict[str, object]], methods: list[str]) -> str:
    labels = [label for label, _, _ in SUMMARY if any(t["metric"] == label for t in table)]  # measured ones
    lines = ["| method | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for method in methods:
        cells = []
        for label in labels:
            hit = [t for t in table if t["method"] == method and t["metric"] == label]
            cells.append(f"{hit[0]['mean']:.3f} ± {hit[0]['ci95']:.3f}" if hit else "n/a")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_all(jobs: list[tuple[str, int]], args, out: str) -> None:
    """Train every (method, seed) run, ``args.jobs`` at a time, each in its own process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    configs = {job: run_config(*job, args.steps, out, args.tiny, args.sft_cache, args.lab) for job in jobs}
    # SFT once, before the parallel runs race to build the same cache entry
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "cli.py"), "sft", "--config", configs[jobs[0]]],
        check=True,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
    )

    def one(job: tuple[str, int]) -> float:
        t0 = time.perf_counter()
        with open(os.path.join(out, "logs", f"{job[0]}_seed{job[1]}.out"), "w") as log:
            cmd = [sys.executable, os.path.join(ROOT, "cli.py"), "fit", "--config", configs[job]]
            subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        print(f"{job[0]:>16} seed {job[1]}: {time.perf_counter() - t0:.0f}s", flush=True)
        return time.perf_counter() - t0

    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(one, jobs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=EXPERIMENT, choices=list(METHODS))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200, help="RL steps per run")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    p.add_argument("--out", default="runs/contraction")
    p.add_argument("--tiny", action="store_true", help="tiny model and batches (smoke runs, tests)")
    p.add_argument("--sft-cache", help="override model.policy.sft.cache_dir")
    p.add_argument("--lab", choices=LABS, help="layer configs/lab/<lab>.yaml over every method (a lab task)")
    p.add_argument("--no-run", action="store_true", help="only rebuild the CSVs and summary from existing logs")
    args = p.parse_args()
    out = os.path.abspath(args.out)
    jobs = [(m, s) for m in args.methods for s in args.seeds]
    t0 = time.perf_counter()
    if not args.no_run:
        run_all(jobs, args, out)
    rows = []
    for method, seed in jobs:
        rows += tidy_rows(method, seed, os.path.join(out, "logs", method, f"seed_{seed}", "metrics.csv"))
    with open(os.path.join(out, "metrics_long.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "seed", "step", "metric", "value"])
        w.writeheader()
        w.writerows(rows)
    table = summarise(rows, args.methods)
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "metric", "start", "mean", "ci95", "seeds"])
        w.writeheader()
        w.writerows(table)
    md = markdown(table, args.methods)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md + "\n")
    print(
        f"\n{len(jobs)} runs in {time.perf_counter() - t0:.0f}s; final values, mean ± 95% CI over seeds {args.seeds}:"
    )
    print(md)
    track = tracking(rows, args.methods)
    print("\nentropy controller (train/policy/entropy vs train/entropy_target):\n" + "\n".join(track))
    with open(os.path.join(out, "summary.md"), "a") as f:
        f.write("\n" + "\n".join(f"- {line}" for line in track) + "\n")
    print(f"\nwrote {out}/metrics_long.csv, summary.csv, summary.md")


if __name__ == "__main__":
    main()
