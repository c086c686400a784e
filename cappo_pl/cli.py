"""LightningCLI entry: ``fit`` / ``validate``, ``sft`` and ``to-hf``, with offline defaults and one-line errors."""

from __future__ import annotations

import os
import sys
import typing

from cappo_pl.config_sources import CONFIG_FLAGS as _CONFIG_FLAGS
from cappo_pl.errors import CappoError, ConfigError, Interrupted


def _offline_env() -> None:
    # No hub or W&B server is ever needed at run time; a missing key must not stall a run.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _bases(path: str) -> list[str]:
    """The parents a config file names in its top-level ``base:`` key, as paths (relative to its folder)."""
    import yaml

    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return []  # jsonargparse reports an unreadable or malformed file itself
    base = cfg.get("base") if isinstance(cfg, dict) else None
    if base is None:
        return []
    names = [base] if isinstance(base, str) else base
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{path}: base: must be a file name or a list of file names, got {base!r}")
    out = []
    for name in names:
        parent = os.path.normpath(os.path.join(os.path.dirname(path), name))
        if not os.path.isfile(parent):
            raise ConfigError(f"{path}: base: {name} not found (looked for {parent})")
        out.append(parent)
    return out


def config_layers(path: str, _seen: tuple[str, ...] = ()) -> list[str]:
    """``path`` and the configs it builds on through ``base:``, oldest first (each parent before its child).

    ``configs/combiners/mgda.yaml`` gives ``[configs/base.yaml, configs/combiners/peers.yaml,
    configs/combiners/mgda.yaml]``; a file reached twice (two parents sharing a grandparent) is kept once,
    at its first place. A cycle is a ConfigError naming the files.
    """
    seen = (*_seen, os.path.realpath(path))
    layers: list[str] = []
    for parent in _bases(path):
        if os.path.realpath(parent) in seen:
            chain = seen[seen.index(os.path.realpath(parent)) :] + (parent,)
            cycle = " -> ".join(os.path.basename(p) for p in chain)
            raise ConfigError(f"{path}: base: {os.path.basename(parent)} makes a cycle ({cycle})")
        for layer in config_layers(parent, seen):
            if all(os.path.realpath(layer) != os.path.realpath(done) for done in layers):
                layers.append(layer)
    return [*layers, path]


def merge_layers(low, high):
    """``high`` over ``low``: dicts key by key; anything else (a list, a class_path that changes) replaced."""
    if not (isinstance(low, dict) and isinstance(high, dict)):
        return high
    if "class_path" in low and "class_path" in high and low["class_path"] != high["class_path"]:
        return high
    return {**low, **{k: merge_layers(low[k], v) if k in low else v for k, v in high.items()}}


def merged_config(path: str) -> dict:
    """A config file with its ``base:`` layers merged into one plain dict (no ``base``): a standalone config.

    For scripts that read or rewrite a config. Lists are replaced whole; jsonargparse merges a restated list
    item by item instead (an item keeps init_args of the one below it), so configs/ restate such init_args
    and tests/test_configs.py checks that this dict parses to the same run as the layered file.
    """
    import yaml

    cfg: dict = {}
    for layer in config_layers(path):
        with open(layer) as f:
            cfg = merge_layers(cfg, yaml.safe_load(f) or {})
    cfg.pop("base", None)
    return cfg


def _refuse_inline_base(value: str) -> None:
    """An inline YAML ``--config`` has no folder to resolve ``base:`` from: refuse it rather than ignore it."""
    import yaml

    try:
        cfg = yaml.safe_load(value)
    except yaml.YAMLError:
        return
    if isinstance(cfg, dict) and cfg.get("base") is not None:
        raise ConfigError("--config: an inline YAML config cannot name a base: put it in a file, or pass its parents")


def expand_config_args(args: list[str]) -> list[str]:
    """Put the ``base:`` parents of every ``--config FILE`` in front of it, as earlier ``--config`` flags.

    jsonargparse merges successive ``--config`` files key by key (a restated list item by item), so a method file
    holds only what differs from ``configs/base.yaml``. A ``--base=null`` follows the last expanded file,
    so the parsed (and saved) config has no ``base`` and a run's saved ``config.yaml`` runs as it is.
    A parent already applied by an earlier ``--config`` is not applied again, which also makes the expansion
    idempotent (a relaunched DDP rank re-reads the expanded argv).
    """
    out: list[str] = []
    reset_at = None
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag not in _CONFIG_FLAGS or not (eq or i + 1 < len(args)):
            out.append(args[i])
            i += 1
            continue
        if not eq:
            i += 1
            value = args[i]
        i += 1
        if not os.path.isfile(value):  # an inline YAML string, or a missing file jsonargparse reports
            _refuse_inline_base(value)
            out += [flag, value]
            continue
        applied = {os.path.realpath(v) for f, v in zip(out, out[1:], strict=False) if f in _CONFIG_FLAGS}
        # a parent already applied earlier (a shared base, or a relaunched DDP rank's expanded argv) is not
        # applied again: it would reset what the files between set
        parents = config_layers(value)[:-1]
        for parent in parents:
            if os.path.realpath(parent) not in applied:
                out += ["--config", parent]
        out += ["--config", value]
        if parents:
            reset_at = len(out)
    if reset_at is not None and out[reset_at : reset_at + 1] != ["--base=null"]:
        out.insert(reset_at, "--base=null")
    return out


def check_args(args: list[str], parser) -> None:
    """Check the config that ``args`` (a subcommand's, ``base:`` expanded) describe, before jsonargparse parses it.

    Raises:
        ConfigError: one line naming the file:line (or command line) that set a bad key or value.

    """
    from lightning.pytorch import Trainer

    from cappo_pl.config_schema import Group, check_raw_config
    from cappo_pl.config_sources import read_sources
    from cappo_pl.data.datamodule import RLDataModule
    from cappo_pl.module import RLModule

    roots: dict = {a.dest.split(".")[0]: typing.Any for a in parser._actions if a.dest}
    roots |= {"trainer": Group(Trainer), "model": Group(RLModule), "data": Group(RLDataModule)}
    check_raw_config(read_sources(args), roots)


def build_cli(args: list[str] | None = None, run: bool = True):
    """Construct the CappoCLI (importing Lightning lazily so ``--help`` errors stay fast).

    ``--config`` files are expanded into their ``base:`` layers first (``expand_config_args``); with
    ``args=None`` that is done on ``sys.argv`` in place, so LightningCLI still reads it (and DDP ranks
    relaunched from it get the same arguments).
    """
    if args is None:
        sys.argv[1:] = expand_config_args(sys.argv[1:])
    else:
        args = expand_config_args(list(args))
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from cappo_pl.checkpointing import raise_if_interrupted, safe_trainer_kwargs, verify_checkpoint
    from cappo_pl.config_schema import condense_parser_error
    from cappo_pl.data.datamodule import RLDataModule
    from cappo_pl.module import RLModule
    from cappo_pl.preflight import check_inputs

    class _OneLineParser(LightningArgumentParser):
        def error(self, message: str, ex: Exception | None = None):
            # Where jsonargparse would print usage and a dump of every Union branch, raise one line instead;
            # its inner parsers (exit_on_error=False) keep raising ArgumentError, which it catches itself.
            if self.exit_on_error:
                raise ConfigError(condense_parser_error(message)) from ex
            return super().error(message, ex)

    class CappoCLI(LightningCLI):
        def instantiate_trainer(self, **kwargs):
            # A rich progress bar by default, unless one is configured or bars are switched off
            # (listing it in YAML would make --trainer.enable_progress_bar=false an error).
            cfg = self._get(self.config_init, "trainer", default={})
            callbacks = list(cfg.get("callbacks") or [])
            if cfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
                kwargs["callbacks"] = [*callbacks, RichProgressBar()]
            return super().instantiate_trainer(**safe_trainer_kwargs(cfg, kwargs))

        def _parse_ckpt_path(self) -> None:
            # Lightning reads the checkpoint's hyperparameters here, before anything is written: a truncated or
            # tampered file must be a one-line error, not a traceback from torch.load.
            sub = self.config.get("subcommand")
            ckpt_path = self.config[sub].get("ckpt_path") if sub else None
            ckpt = verify_checkpoint(ckpt_path) if ckpt_path else None
            if ckpt is not None and "hyper_parameters" not in ckpt:
                return  # ours never has any: spare Lightning's second, full read of a big file
            super()._parse_ckpt_path()

        def parse_arguments(self, parser, args) -> None:
            # Our own pass first: it knows which file:line set each value, jsonargparse does not.
            argv = list(sys.argv[1:] if args is None else args)
            subparsers = getattr(self, "_subcommand_parsers", None)  # none when built with run=False
            if {"-h", "--help"} & set(argv) or any(a.partition("=")[0].endswith(".help") for a in argv):
                pass  # help of the parser or of a class (--model.advantage.help GRPO): jsonargparse prints it
            elif not subparsers:
                check_args(argv, parser)
            elif argv and argv[0] in subparsers:
                check_args(argv[1:], subparsers[argv[0]])
            super().parse_arguments(parser, args)

        def before_fit(self) -> None:
            check_inputs(self.model, self.datamodule)

        def before_validate(self) -> None:
            check_inputs(self.model, self.datamodule)

        def after_fit(self) -> None:
            raise_if_interrupted(self.trainer)

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
            # A config's parent layer(s), read before parsing (expand_config_args); reset to null after.
            parser.add_argument(
                "--base",
                type=str | list[str] | None,
                default=None,
                help="Parent config file(s) of a --config file, relative to it (layers: configs/base.yaml).",
            )

    return CappoCLI(
        RLModule,
        RLDataModule,
        parser_class=_OneLineParser,
        # no prefixes of option names: a typo must not silently match another key (nor --conf skip base: layers)
        parser_kwargs={"allow_abbrev": False},
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def _sft(args: list[str]) -> None:
    """``cappo-pl sft --config X.yaml``: train (or find cached) the SFT warm start of X's policy."""
    from cappo_pl.preflight import check_inputs

    cli = build_cli(args, run=False)
    check_inputs(cli.model, cli.datamodule)
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
    except KeyboardInterrupt:  # before training started (SFT, checks); during it GracefulInterrupt answers
        print("error: interrupted before training started; nothing was saved", file=sys.stderr)
        sys.exit(130)
    except CappoError as err:
        if not isinstance(err, Interrupted) or os.environ.get("LOCAL_RANK", "0") == "0":  # one line, not one per rank
            print(f"error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))
