"""Time one RL step, split into rollout, scoring and update, for the tiny and a ~10M-parameter model.

    python bench/step.py                     # both models, defaults below
    python bench/step.py --models tiny --completion-len 32

Every setting a peer framework needs to time the same step is printed beside the numbers.
Completions are forced to the full length (EOS disabled) so every run does the same work.
Numbers: median over --repeats steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cappo_pl.data import SumTask  # noqa: E402
from cappo_pl.losses import TokenBatch  # noqa: E402
from cappo_pl.models import TinyModelConfig, build_char_tokenizer, build_tiny_model  # noqa: E402
from cappo_pl.objectives import PolicyObjective  # noqa: E402
from cappo_pl.rollout import RolloutConfig, sample  # noqa: E402
from cappo_pl.scoring import score_completions  # noqa: E402

MODELS = {
    "tiny": TinyModelConfig(),
    "10m": TinyModelConfig(hidden_size=320, num_layers=8, num_heads=5, intermediate_size=1280),
}


def one_step(model, tok, prompts, cfg: RolloutConfig, epochs: int, minibatches: int, opt) -> dict[str, float]:
    enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    ro = sample(model, enc["input_ids"], enc["attention_mask"], cfg, eos_id=-1, pad_id=tok.pad_token_id, generator=gen)
    t1 = time.perf_counter()
    T = ro.completion_ids.shape[1]
    with torch.no_grad():
        old = score_completions(model, ro.input_ids, ro.attention_mask, T, cfg.temperature)
    t2 = time.perf_counter()
    n = ro.completion_ids.shape[0]
    adv = torch.randn(n, 1, generator=gen).expand(n, T)
    objective = PolicyObjective()
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).chunk(minibatches):
            sub = ro.select(idx)
            cur = score_completions(model, sub.input_ids, sub.attention_mask, T, cfg.temperature)
            tb = TokenBatch(cur.logp, old.logp[idx], sub.rollout_logp, adv[idx], sub.completion_mask, cur.entropy)
            loss, _ = objective(tb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    t3 = time.perf_counter()
    return {"rollout": t1 - t0, "scoring": t2 - t1, "update": t3 - t2, "tokens": n * T}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--prompts", type=int, default=16, help="prompts per RL step")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    p.add_argument("--completion-len", type=int, default=64, help="tokens generated per completion")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=1, help="PPO epochs")
    p.add_argument("--minibatches", type=int, default=1, help="optimizer steps per epoch")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = build_char_tokenizer()
    prompts = [r.prompt for r in SumTask().train_records()[: args.prompts]]
    cfg = RolloutConfig(group_size=args.group_size, max_new_tokens=args.completion_len, temperature=args.temperature)
    print(
        f"settings: prompts/step={args.prompts} completions/prompt={args.group_size} "
        f"completion_len={args.completion_len} "
        f"prompt_len<={max(len(tok(p)['input_ids']) for p in prompts)} temperature={args.temperature} "
        f"ppo_epochs={args.epochs} minibatches={args.minibatches} threads={args.threads} dtype=float32 "
        f"device=cpu torch={torch.__version__} KV-cache=on repeats={args.repeats} (median, after 1 warm-up)"
    )
    cols = ("model", 6), ("params", 8), ("rollout s", 10), ("scoring s", 10), ("update s", 9), ("step s", 7)
    print(" ".join(f"{c:>{w}}" for c, w in (*cols, ("tok/s", 8), ("gen tok/s", 10))))
    for name in args.models:
        torch.manual_seed(0)
        model = build_tiny_model(MODELS[name], tok)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        runs = [
            one_step(model, tok, prompts, cfg, args.epochs, args.minibatches, opt) for _ in range(args.repeats + 1)
        ][1:]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        total = med["rollout"] + med["scoring"] + med["update"]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"{name:>6} {params:>7.2f}M {med['rollout']:>10.3f} {med['scoring']:>10.3f} {med['update']:>9.3f} "
            f"{total:>7.3f} {med['tokens'] / total:>8.0f} {med['tokens'] / med['rollout']:>10.0f}"
        )


if __name__ == "__main__":
    main()
