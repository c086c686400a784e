"""Export the trained policy as a plain HF folder (LoRA merged) for use outside cappo_pl."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import lightning.pytorch as pl
import torch


def export_hf(policy: torch.nn.Module, tokenizer, out: str | Path, peft_model=None) -> Path:
    """Save ``policy`` (with LoRA adapters merged into a copy when ``peft_model`` is given) and its tokenizer.

    The result loads with ``AutoModelForCausalLM.from_pretrained(out)`` and needs neither peft nor cappo_pl.
    The training model is left as it is (the merge happens on a copy).

    Returns:
        The folder.

    """
    out = Path(out)
    model = policy if peft_model is None else copy.deepcopy(peft_model).merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class ExportHF(pl.Callback):
    """At the end of ``fit``, save the policy as an HF folder (``<log_dir>/hf_export`` by default).

    Args:
        dirpath: where to write (None: ``hf_export`` inside the run's log directory).

    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from cappo_pl.errors import ConfigError
        from cappo_pl.strategies import shards_parameters

        if shards_parameters(trainer.strategy):  # rank 0 alone holds only its shard of every weight
            raise ConfigError(
                "trainer.callbacks: ExportHF cannot write ZeRO-3/FSDP shards; convert the checkpoint with cli.py to-hf"
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:  # every rank holds the same weights under DDP
            return
        out = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf_export")
        peft = pl_module._peft[0] if getattr(pl_module, "_peft", None) else None
        export_hf(pl_module.policy, pl_module.tokenizer, out, peft)
        print(f"exported the policy to {out}")
