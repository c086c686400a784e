"""Run one combined update under Lightning (DDP on CPU/gloo, or one process) and dump what it did.

Usage: ``python tests/ddp_probe.py OUT_DIR DEVICES``. Every rank takes its contiguous slice of one
fixed global batch, with unequal token counts; the losses are token means over the global batch
(``GlobalBatch``), so the ranks' average is the single-process loss. For each combiner and Gram space
it writes the coefficients, the Gram and a parameter checksum after one optimizer step
(``OUT_DIR/rank<r>.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from cappo_pl.combiners import MGDA, CAGrad, PCGrad, Scalarized, UPGrad
from cappo_pl.gradients import combined_backward
from cappo_pl.losses.aggregation import GlobalBatch, agg_loss
from cappo_pl.models import TinyModelConfig, build_char_tokenizer, build_tiny_model
from cappo_pl.scoring import score_completions

GLOBAL = 8  # sequences in the global batch
COMBINERS = {
    "Scalarized": Scalarized, "MGDA": MGDA, "PCGrad": PCGrad, "CAGrad": CAGrad, "UPGrad": UPGrad,
    # reads the loss values too: every rank must be given the global ones
    "MGDA-loss": lambda: MGDA(normalization="loss"),
}  # fmt: skip


def global_batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 90, (GLOBAL, 10), generator=gen)
    return {
        "ids": ids,
        "adv": torch.randn(GLOBAL, 1, generator=gen).expand(GLOBAL, 5),
        "ref": torch.randn(GLOBAL, 5, generator=gen) * 0.1 - 3.0,
        # unequal completion lengths: the ranks hold different token counts (2 + 1 + 5 + 3 vs 4 + 5 + 1 + 2)
        "len": torch.tensor([2, 1, 5, 3, 4, 5, 1, 2]),
    }


class Probe(pl.LightningModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy = build_tiny_model(
            TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), build_char_tokenizer()
        )
        self.out = out

    def configure_optimizers(self):
        return torch.optim.SGD(self.policy.parameters(), lr=0.1)

    def _dp(self, n):
        return GlobalBatch(n, lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")) if n > 1 else None

    def losses(self, b, space):
        ids = b["ids"]
        s = score_completions(
            self.policy, ids, torch.ones_like(ids), 5, 1.0, gram_space=space if space != "params" else None
        )
        m = (torch.arange(5)[None] < b["len"][:, None]).float()
        dp = self._dp(self.trainer.world_size)  # token means over the global batch, as the module's losses
        log_ratio = b["ref"] - s.logp
        kl = agg_loss(log_ratio.exp() - 1 - log_ratio, m, "token-mean", dp=dp)
        policy = agg_loss(-b["adv"] * s.logp, m, "token-mean", dp=dp)
        return s, [policy, -agg_loss(s.entropy, m, "token-mean", dp=dp), kl]

    def training_step(self, _batch, _idx):
        n, r = self.trainer.world_size, self.global_rank
        per = GLOBAL // n
        b = {k: v[r * per : (r + 1) * per] for k, v in global_batch().items()}
        opt = self.optimizers()
        record = {}
        for name, combiner in COMBINERS.items():
            for space in ("params", "hidden"):
                opt.zero_grad(set_to_none=True)
                s, losses = self.losses(b, space)
                update = combined_backward(
                    losses, torch.tensor([1.0, 0.01, 0.05]), combiner(), space,
                    lambda loss, retain: self.manual_backward(loss, retain_graph=retain),
                    list(self.policy.parameters()), s, self._dp(n),
                )  # fmt: skip
                grad = torch.cat([p.grad.reshape(-1) for p in self.policy.parameters() if p.grad is not None])
                entry = {"c": update.coefficients.tolist(), "gram": update.gram.tolist(), "grad": grad.tolist()}
                record[space if name == "MGDA" else f"{name}/{space}"] = entry
        # a loss that is non-finite on one rank only: every rank must skip (a rank-local skip would hang
        # the others in the Gram all-reduce / DDP's gradient reduction)
        opt.zero_grad(set_to_none=True)
        s, losses = self.losses(b, "hidden")
        if r == n - 1:
            losses[0] = losses[0] * float("nan")
        update = combined_backward(
            losses, torch.tensor([1.0, 0.01, 0.05]), MGDA(), "hidden",
            lambda loss, retain: self.manual_backward(loss, retain_graph=retain), list(self.policy.parameters()),
            s, self._dp(n),
        )  # fmt: skip
        record["nan_skipped"] = update.skipped
        opt.zero_grad(set_to_none=True)
        s, losses = self.losses(b, "hidden")
        combined_backward(
            losses, torch.tensor([1.0, 0.01, 0.05]), MGDA(), "hidden",
            lambda loss, retain: self.manual_backward(loss, retain_graph=retain), list(self.policy.parameters()),
            s, self._dp(n),
        )  # fmt: skip
        opt.step()  # with the hidden-space update: the parameters must stay identical across ranks
        record["params"]["after_step"] = torch.cat([p.detach().reshape(-1) for p in self.policy.parameters()]).tolist()
        (self.out / f"rank{r}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Probe(out), DataLoader(list(range(devices * 2)), batch_size=1))
