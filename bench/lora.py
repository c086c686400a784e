"""LoRA vs full fine-tuning on the ~10M model: peak memory and the time of one update phase.

    python bench/lora.py                       # both variants, each in its own process
    python bench/lora.py --completion-len 32

Each variant runs in a fresh subprocess so its peak resident memory (``ru_maxrss``) is its own. The
step is what RLModule does with a KL objective: score the reference (full: a frozen copy; LoRA: the
same model with adapters off), then forward + backward + AdamW on the policy, over fixed rollouts.
Reported: trainable parameters, peak RSS above the process's baseline after imports, and the median
update time over --repeats steps after one warm-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cappo_pl.models import LoRAConfig, add_lora, build_char_tokenizer, build_tiny_model, freeze  # noqa: E402
from cappo_pl.scoring import score_completions  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from step import MODELS  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_variant(variant: str, args) -> dict:
    torch.set_num_threads(args.threads)
    base_rss = _rss_mb()
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(MODELS[args.model], tok)
    peft = None
    if variant == "lora":
        peft = add_lora(model, LoRAConfig(r=args.rank, alpha=2 * args.rank))
        reference = None
    else:
        reference = freeze(copy.deepcopy(model))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    n, t = args.rows, args.completion_len
    ids = torch.randint(3, len(tok), (n, 4 + t), generator=g)
    mask = torch.ones_like(ids)
    adv = torch.randn(n, 1, generator=g).expand(n, t)
    times = []
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            if peft is not None:
                with peft.disable_adapter():
                    ref = score_completions(model, ids, mask, t).logp
            else:
                ref = score_completions(reference, ids, mask, t).logp
        cur = score_completions(model, ids, mask, t)
        loss = -(adv * cur.logp).mean() + 0.04 * (cur.logp - ref).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return {
        "variant": variant,
        "trainable_m": sum(p.numel() for p in params) / 1e6,
        "total_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_rss_mb": _rss_mb() - base_rss,
        "update_s": statistics.median(times[1:]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="10m", choices=list(MODELS))
    p.add_argument("--rows", type=int, default=128, help="completions per update (16 prompts x 8)")
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank; q/k/v/o projections)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variant", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:  # the child process
        print(json.dumps(run_variant(args.variant, args)))
        return
    print(
        f"settings: model={args.model} rows={args.rows} completion_len={args.completion_len} lora_rank={args.rank} "
        f"threads={args.threads} dtype=float32 device=cpu torch={torch.__version__} repeats={args.repeats} "
        "(median after 1 warm-up); step = reference scoring + forward + backward + AdamW"
    )
    results = {}
    for variant in ("full", "lora"):
        cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
    print(f"{'variant':>8} {'trainable':>10} {'params':>8} {'peak RSS MB':>12} {'update s':>9}")
    for r in results.values():
        print(
            f"{r['variant']:>8} {r['trainable_m']:>9.2f}M {r['total_m']:>7.2f}M {r['peak_rss_mb']:>12.0f} "
            f"{r['update_s']:>9.3f}"
        )
    full, lora = results["full"], results["lora"]
    print(
        f"lora / full: peak RSS {lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x, "
        f"update time {lora['update_s'] / full['update_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
