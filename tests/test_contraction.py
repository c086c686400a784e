"""The contraction experiment's runner (tiny, short) and the notebook that reads its logs."""

import csv
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import contraction  # noqa: E402


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """A short run of every method, two seeds: the notebook's fixture."""
    out = tmp_path_factory.mktemp("contraction")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "contraction.py"), "--tiny", "--steps", "3", "--seeds", "0", "1",
         "--jobs", "2", "--out", str(out), "--sft-cache", str(out / "sft")],
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return out


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_runner_writes_tidy_logs_and_summary(logs):
    rows = _read(logs / "metrics_long.csv")
    assert set(rows[0]) == {"method", "seed", "step", "metric", "value"}
    assert {r["method"] for r in rows} == set(contraction.EXPERIMENT)
    for method in contraction.EXPERIMENT:
        for seed in ("0", "1"):
            mine = [r for r in rows if r["method"] == method and r["seed"] == seed]
            steps = sorted({int(r["step"]) for r in mine if r["metric"] == "train/reward/mean"})
            assert steps == [0, 1, 2]
            srr_steps = sorted(int(r["step"]) for r in mine if r["metric"] == "val/srr")
            assert srr_steps[0] == 0 and srr_steps[-1] == 3  # the initial policy and after the last update
    assert any(r["metric"] == "train/entropy_coef" for r in rows if r["method"] == "cappo")
    # the summary's mean and CI against an independent computation (SciPy's t quantile)
    stats = pytest.importorskip("scipy.stats")
    summary = _read(logs / "summary.csv")
    (row,) = [r for r in summary if r["method"] == "grpo" and r["metric"] == "entropy"]
    finals = []
    for seed in ("0", "1"):
        pts = sorted(
            (int(r["step"]), float(r["value"]))
            for r in rows
            if r["method"] == "grpo" and r["seed"] == seed and r["metric"] == "train/policy/entropy"
        )
        finals.append(sum(v for _, v in pts[-10:]) / len(pts[-10:]))
    mean = sum(finals) / 2
    sd = math.sqrt(sum((f - mean) ** 2 for f in finals))
    assert float(row["mean"]) == pytest.approx(mean)
    assert float(row["ci95"]) == pytest.approx(stats.t.ppf(0.975, 1) * sd / math.sqrt(2), rel=1e-4)
    assert (logs / "summary.md").read_text().startswith("| method |")


@pytest.fixture(scope="module")
def lab_logs(tmp_path_factory):
    """A short GRPO run on the lab's sum task (configs/lab/sum.yaml layered by --lab)."""
    out = tmp_path_factory.mktemp("lab")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "contraction.py"), "--tiny", "--lab", "sum", "--steps", "2",
         "--seeds", "0", "--methods", "grpo", "--jobs", "1", "--out", str(out), "--sft-cache", str(out / "sft")],
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return out


def test_lab_runs_log_the_exact_metrics_from_step_0(lab_logs):
    rows = _read(lab_logs / "metrics_long.csv")
    for key in ("val/exact/pass@1", "val/exact/coverage@64", "val/hidden/pass@8", "train_eval/exact/coverage@64"):
        steps = sorted(int(r["step"]) for r in rows if r["metric"] == key)
        assert steps[0] == 0 and steps[-1] == 2, key  # the SFT policy, ..., after the last update
    labels = {r["metric"] for r in _read(lab_logs / "summary.csv")}
    assert {"exact pass@1 (val)", "coverage@64 (val)", "hidden pass@8 (train)"} <= labels


def _execute_notebook(logs, tmp_path, **extra_env):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(ROOT, "notebooks", "contraction.ipynb"), as_version=4)
    fig = tmp_path / "contraction.svg"
    env = {"CONTRACTION_DIR": str(logs), "CONTRACTION_FIG": str(fig), **extra_env}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        meta = {"metadata": {"path": str(tmp_path)}}
        NotebookClient(nb, timeout=300, kernel_name="python3", resources=meta).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert fig.exists() and fig.stat().st_size > 1000
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_contraction_notebook_executes_on_the_logs(logs, tmp_path):
    text = _execute_notebook(logs, tmp_path)
    assert "mean ± 95% CI" in text
    for method in contraction.EXPERIMENT:
        assert method in text


def test_contraction_notebook_draws_the_pareto_panel_on_lab_logs(lab_logs, tmp_path):
    pareto = tmp_path / "pareto.svg"
    text = _execute_notebook(lab_logs, tmp_path, PARETO_FIG=str(pareto))
    assert pareto.exists() and pareto.stat().st_size > 1000
    # one trajectory line per panel: val and train_eval, coverage@64 and hidden pass@64
    lines = [line.split() for line in text.splitlines() if line.strip().startswith("grpo ") and "->" in line]
    assert {(w[1], w[5]) for w in lines} == {
        ("val/exact/pass@1", "val/exact/coverage@64"), ("val/exact/pass@1", "val/hidden/pass@8"),
        ("train_eval/exact/pass@1", "train_eval/exact/coverage@64"),
        ("train_eval/exact/pass@1", "train_eval/hidden/pass@8"),
    }  # fmt: skip
    rows = _read(lab_logs / "metrics_long.csv")
    start = [float(r["value"]) for r in rows if r["metric"] == "val/exact/pass@1" and r["step"] == "0"]
    (val_line,) = [w for w in lines if w[5] == "val/exact/coverage@64"]
    assert float(val_line[2]) == pytest.approx(start[0], abs=5e-4)  # printed with 3 decimals
