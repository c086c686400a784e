"""Step time and peak memory of one update: scalarized vs MGDA in each Gram space, side by side.

    python bench/combiners.py                       # tiny and ~10M models, K = 3 objectives
    python bench/combiners.py --models tiny --repeats 5

One update = forward with grad over a fixed batch of rollouts + K = 3 objectives (PPO-clip policy,
entropy bonus, k3 KL) + Gram + combiner + backward + clip + AdamW step: the part of an RL step that
the combiner changes (rollout and pi_old scoring are the same for every row; see bench/step.py).
Each configuration runs in its own process so peak memory is not shared between rows:

- CPU: peak resident memory above the resident memory before the timed steps (``VmHWM`` after a
  reset, minus ``VmRSS``; glibc is told to return freed blocks so RSS follows live memory).
- CUDA: ``max_memory_allocated`` above the memory allocated before the timed steps.

Ratios are to the plain scalarized step (one backward, no Gram). ``RL step`` adds the rollout of
the same batch (sampling ``completion_len`` tokens with the KV cache), which every row shares.
Targets (issue 3): MGDA in hidden space <= 1.10x; params space <= (1 + 2K) / 3 = 2.33x for K = 3.
The params space costs one forward F and K backward passes B by design, so its floor is
(F + K B) / (F + B); the last line per model prints it from the measured F and B.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cappo_pl.combiners import MGDA, Scalarized  # noqa: E402
from cappo_pl.gradients import combined_backward  # noqa: E402
from cappo_pl.losses import TokenBatch  # noqa: E402
from cappo_pl.models import TinyModelConfig, build_char_tokenizer, build_tiny_model  # noqa: E402
from cappo_pl.objectives import EntropyBonus, KLPenalty, PolicyObjective  # noqa: E402
from cappo_pl.rollout import RolloutConfig, sample  # noqa: E402
from cappo_pl.scoring import score_completions  # noqa: E402

MODELS = {
    "tiny": TinyModelConfig(),
    "10m": TinyModelConfig(hidden_size=320, num_layers=8, num_heads=5, intermediate_size=1280),
}
# name -> (combiner, Gram space, monitor)
ROWS = {
    "scalarized": (Scalarized, "hidden", False),
    "scalarized+monitor": (Scalarized, "hidden", True),
    "mgda/hidden": (MGDA, "hidden", True),
    "mgda/logits": (MGDA, "logits", True),
    "mgda/params": (MGDA, "params", True),
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def setup(model_name: str, args: argparse.Namespace):
    """Model, optimizer and one fixed batch of rollouts; returns ``(update(row), n_params, device)``."""
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(MODELS[model_name], tok).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    n, p_len, t_len = args.prompts * args.group_size, args.prompt_len, args.completion_len
    ids = torch.randint(4, len(tok), (n, p_len + t_len), generator=gen).to(device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        old = score_completions(model, ids, mask, t_len)
    adv = torch.randn(n, 1, generator=gen).expand(n, t_len).to(device)
    ref = (old.logp - 0.05 * torch.rand(n, t_len, generator=gen).to(device)).detach()
    objectives = [PolicyObjective(), EntropyBonus(weight=0.01), KLPenalty(weight=0.04)]
    weights = torch.tensor([o.weight for o in objectives])
    combiners = {row: cls() for row, (cls, _, _) in ROWS.items()}

    def forward(backward: str = "none") -> None:
        """The plain update's forward, then no backward, a plain one, or one keeping the graph (cost model)."""
        cur = score_completions(model, ids, mask, t_len)
        tb = TokenBatch(cur.logp, old.logp, old.logp, adv, mask[:, -t_len:].float(), cur.entropy, ref_logp=ref)
        loss = sum(o.weight * o(tb)[0] for o in objectives)
        if backward != "none":
            loss.backward(retain_graph=backward == "retain")
        opt.zero_grad(set_to_none=True)

    def update(row: str) -> None:
        _, space, monitor = ROWS[row]
        cur = score_completions(model, ids, mask, t_len, gram_space=space if space != "params" else None)
        tb = TokenBatch(cur.logp, old.logp, old.logp, adv, mask[:, -t_len:].float(), cur.entropy, ref_logp=ref)
        losses = [o(tb)[0] for o in objectives]
        opt.zero_grad(set_to_none=True)
        combined_backward(
            losses, weights, combiners[row], space, lambda loss, retain: loss.backward(retain_graph=retain),
            list(model.parameters()), cur, monitor=monitor,
        )  # fmt: skip
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def rollout() -> None:
        enc = tok(["17="] * args.prompts, padding=True, padding_side="left", return_tensors="pt")
        cfg = RolloutConfig(group_size=args.group_size, max_new_tokens=t_len)
        sample(model, enc["input_ids"].to(device), enc["attention_mask"].to(device), cfg, -1, tok.pad_token_id, gen)

    update.rollout, update.forward = rollout, forward
    return update, sum(p.numel() for p in model.parameters()), device


def time_child(model_name: str, rows: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Median update time per row, rows interleaved round-robin in one process (fair under drift)."""
    update, _, _ = setup(model_name, args)
    for row in rows:
        update(row)  # warm-up
    times: dict[str, list[float]] = {row: [] for row in rows}
    for _ in range(args.repeats):
        for row in rows:
            t0 = time.perf_counter()
            update(row)
            times[row].append(time.perf_counter() - t0)
    result = {row: statistics.median(t) for row, t in times.items()}
    result["rollout"] = statistics.median(_timed(update.rollout) for _ in range(max(1, args.repeats // 2)))
    for name, mode in (("forward", "none"), ("fwd+bwd", "free"), ("fwd+bwd_retain", "retain")):
        result[name] = statistics.median(_timed(lambda m=mode: update.forward(m)) for _ in range(args.repeats))
    return result


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def memory_child(model_name: str, row: str, args: argparse.Namespace) -> dict[str, float]:
    """Peak memory of one update above the memory held before it (its own process)."""
    update, params, device = setup(model_name, args)
    update(row)  # warm-up: optimizer state, allocator pools
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status_kib("VmRSS") * 1024
    update(row)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kib("VmHWM") * 1024
    return {"peak_mib": (peak - base) / 2**20, "params": params, "device": device.type}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--malloc", choices=("cached", "default"), default="cached",
        help="cached: glibc keeps freed blocks (as a caching allocator would); default: glibc's own settings",
    )  # fmt: skip
    p.add_argument("--time-child", help=argparse.SUPPRESS)
    p.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.time_child:
        print(json.dumps(time_child(args.time_child, args.rows, args)))
        return
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, args)))
        return
    # glibc's defaults hand blocks > 32 MiB back to the OS on free, so every step page-faults its
    # activations afresh, and the params space (whose retained graph keeps more memory live) pays
    # more of that. CUDA, jemalloc and tcmalloc cache instead; "cached" makes glibc do the same.
    cached = {
        "MALLOC_MMAP_THRESHOLD_": "33554432",
        "MALLOC_TRIM_THRESHOLD_": "4294967296",
        "MALLOC_TOP_PAD_": "536870912",
    }
    time_env = {**os.environ, **(cached if args.malloc == "cached" else {})}
    print(
        f"settings: K=3 (policy, entropy, kl) sequences={args.prompts * args.group_size} "
        f"prompt_len={args.prompt_len} completion_len={args.completion_len} threads={args.threads} dtype=float32 "
        f"torch={torch.__version__} malloc={args.malloc} repeats={args.repeats} "
        "(median, rows interleaved after 1 warm-up each; memory: one process per row)"
    )
    print(
        f"{'model':>6} {'params':>8} {'row':>19} {'update s':>9} {'x time':>7} {'peak MiB':>9} {'x mem':>6} "
        f"{'RL step s':>10} {'x step':>7}"
    )
    # glibc returns freed blocks to the OS only in the memory runs (it slows allocation down)
    mem_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    common = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("models", "rows")]
    common = [a for a in common if not a.startswith(("--time-child", "--memory-child"))]

    def run(extra: list[str], env=None) -> dict:
        cmd = [sys.executable, __file__, *extra, *common, "--rows", *args.rows]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    for model in args.models:
        times = run(["--time-child", model], time_env)
        mems = {row: run(["--memory-child", model, row], mem_env) for row in args.rows}
        t0, m0 = times[args.rows[0]], mems[args.rows[0]]["peak_mib"]
        for row in args.rows:
            m, step = mems[row], times["rollout"] + times[row]
            print(
                f"{model:>6} {m['params'] / 1e6:>7.2f}M {row:>19} {times[row]:>9.3f} {times[row] / t0:>6.2f}x "
                f"{m['peak_mib']:>9.1f} {m['peak_mib'] / max(m0, 1e-9):>5.2f}x "
                f"{step:>10.3f} {step / (times['rollout'] + t0):>6.2f}x"
            )
        if "scalarized" in times and "mgda/params" in times:
            # Cost model of the params space: one forward F, K - 1 backward passes over a retained graph
            # (B_r), a last freeing one (B), and the clip + AdamW step S, against F + B + S.
            f = times["forward"]
            b, b_r = times["fwd+bwd"] - f, times["fwd+bwd_retain"] - f
            step = max(times["scalarized"] - times["fwd+bwd"], 0.0)
            floor = (f + 2 * b_r + b + step) / (f + b + step)
            print(
                f"{model:>6} cost model: F={f:.3f}s B={b:.3f}s B_retained={b_r:.3f}s step={step:.3f}s; B/F={b / f:.2f} "
                f"(the target (1 + 2K)/3 = 2.33x assumes B/F = 2); floor of params (F + 2 B_r + B + step) / "
                f"(F + B + step) = {floor:.2f}x"
            )


if __name__ == "__main__":
    main()
