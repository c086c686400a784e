"""LightningCLI entry: ``fit`` / ``validate``, ``sft`` and ``to-hf``, with offline defaults and one-line errors."""

from __future__ import annotations

import os
import sys

from cappo_pl.errors import CappoError


def _offline_env() -> None:
    # No hub or W&B server is ever needed at run time; a missing key must not stall a run.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_cli(args: list[str] | None = None, run: bool = True):
    """Construct the CappoCLI (importing Lightning lazily so ``--help`` errors stay fast)."""
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
    from lightning.pytorch.cli import LightningCLI

    from cappo_pl.data.datamodule import RLDataModule
    from cappo_pl.module import RLModule

    class CappoCLI(LightningCLI):
        def instantiate_trainer(self, **kwargs):
            # A rich progress bar by default, unless one is configured or bars are switched off
            # (listing it in YAML would make --trainer.enable_progress_bar=false an error).
            cfg = self._get(self.config_init, "trainer", default={})
            callbacks = list(cfg.get("callbacks") or [])
            if cfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
                kwargs["callbacks"] = [*callbacks, RichProgressBar()]
            return super().instantiate_trainer(**kwargs)

        def add_arguments_to_parser(self, parser) -> None:
            parser.set_defaults(
                {
                    "trainer.logger": {
                        "class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": "runs"},
                    },
                    "trainer.log_every_n_steps": 1,
                    "trainer.num_sanity_val_steps": 0,
                }
            )

    return CappoCLI(
        RLModule,
        RLDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def _sft(args: list[str]) -> None:
    """``cappo-pl sft --config X.yaml``: train (or find cached) the SFT warm start of X's policy."""
    cli = build_cli(args, run=False)
    cli.model.prepare_sft(cli.datamodule)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``cli.py`` and the ``cappo-pl`` console script."""
    _offline_env()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "sft":
            _sft(args[1:])
        elif args and args[0] == "to-hf":
            from cappo_pl.convert import main as to_hf

            to_hf(args[1:])
        else:
            # args=None lets LightningCLI read sys.argv itself (it warns when given both).
            build_cli(None if argv is None else args)
    except CappoError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
