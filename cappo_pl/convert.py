"""Turn a training checkpoint (a ``.ckpt`` file, a ZeRO or an FSDP shard folder) into a plain HF folder.

``python cli.py to-hf --ckpt CKPT --base BASE_HF_FOLDER --out OUT``.

The base folder supplies the architecture and tokenizer (``model.policy.path``, or the SFT cache folder of the
built-in model); the checkpoint's ``policy.*`` weights replace its weights. ZeRO-2/3 shards are consolidated in
fp32 by DeepSpeed's own ``zero_to_fp32`` (through Lightning), FSDP shard folders by torch.distributed.checkpoint
(model entries only). LoRA adapters are merged into the weights.

Every file this module opens itself is loaded with ``weights_only=True`` (``cappo_pl.checkpointing.safe_load``);
DeepSpeed's shards are read by DeepSpeed's own consolidation, which does not offer that.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from cappo_pl.checkpointing import safe_load, verify_checkpoint
from cappo_pl.errors import CappoError, ConfigError
from cappo_pl.models import load_pretrained


def checkpoint_state(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's ``state_dict`` (ZeRO and FSDP shard folders consolidated)."""
    path = Path(ckpt)
    if path.is_dir() and (path / ".metadata").is_file():  # FSDP: a torch.distributed.checkpoint folder
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        # torch's dcp_to_torch_save without the optimizer states (about 3x the weights): one process reads
        # every shard of the model's entries only
        state: dict = {}
        planner = _EmptyStateDictLoadPlanner(keys={"state_dict"})
        _load_state_dict(state, storage_reader=FileSystemReader(path), planner=planner, no_dist=True)
        return state["state_dict"]
    if path.is_dir():  # DeepSpeed writes a folder (sharded model / optimizer states per rank)
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "consolidated.pt"
            convert_zero_checkpoint_to_fp32_state_dict(path, out)
            return safe_load(out, "--ckpt")["state_dict"]
    if not path.is_file():
        raise ConfigError(f"--ckpt: {path} is neither a checkpoint file nor a ZeRO or FSDP checkpoint folder")
    return safe_load(path, "--ckpt")["state_dict"]


def checkpoint_extras(ckpt: str | Path) -> dict:
    """The checkpoint's other entries (loops, callbacks, our ``cappo_*`` keys), without loading the weights twice."""
    path = Path(ckpt)
    if path.is_dir() and (path / "meta.pt").is_file():  # FSDP: Lightning writes them next to the shards
        return safe_load(path / "meta.pt", "--ckpt")
    if path.is_dir():  # DeepSpeed: the client state sits in the model-states file
        states = sorted((path / "checkpoint").glob("mp_rank_*_model_states.pt"))
        return safe_load(states[0], "--ckpt", mmap=True) if states else {}
    return safe_load(path, "--ckpt", mmap=True)


def merge_lora(policy: dict[str, torch.Tensor], r: int, alpha: float) -> dict[str, torch.Tensor]:
    """Fold peft LoRA adapters into plain weights: ``W = W_0 + (alpha / r) B A`` (Hu et al. 2021).

    Args:
        policy: a peft-injected model's state: ``<m>.base_layer.weight`` (out, in), ``<m>.lora_A.default.weight``
            (r, in), ``<m>.lora_B.default.weight`` (out, r), and plain entries.
        r: the adapters' rank.
        alpha: their scale numerator.

    Returns:
        The state of the plain model: ``<m>.weight`` (and ``<m>.bias``), no adapter entries.

    """
    out: dict[str, torch.Tensor] = {}
    for key, value in policy.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            module, leaf = key.split(".base_layer.")
            if leaf == "weight":
                a, b = policy[f"{module}.lora_A.default.weight"], policy[f"{module}.lora_B.default.weight"]
                value = value + (alpha / r) * (b.float() @ a.float()).to(value.dtype)
            key = f"{module}.{leaf}"
        out[key] = value
    return out


def checkpoint_to_hf(ckpt: str | Path, base: str | Path, out: str | Path) -> Path:
    """Write ``out``: the base folder's architecture and tokenizer with the checkpoint's policy weights.

    LoRA adapters are merged into the weights (``merge_lora``, with the ``r`` and ``alpha`` the run saved).

    Raises:
        CheckpointError: a missing, truncated or tampered checkpoint (one line naming it).
        ConfigError: a LoRA checkpoint without its settings, or weights that do not fit the base architecture.

    """
    verify_checkpoint(ckpt, "--ckpt")
    state = checkpoint_state(ckpt)
    policy = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    if any(".lora_" in k for k in policy):
        lora = checkpoint_extras(ckpt).get("cappo_lora")
        if lora is None:
            raise ConfigError(f"--ckpt: {ckpt} holds LoRA adapters but not their r/alpha; export it with ExportHF")
        policy = merge_lora(policy, lora["r"], lora["alpha"])
    model, tokenizer = load_pretrained(base)
    try:
        missing, unexpected = model.load_state_dict(policy, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ConfigError(f"--base: {base} does not match the checkpoint: {str(err).splitlines()[0]}") from None
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]  # a tied head is the embedding
    if unexpected or missing:
        raise ConfigError(
            f"--base: {base} does not match the checkpoint (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def main(args: list[str]) -> None:
    """``cli.py to-hf``."""
    p = argparse.ArgumentParser(prog="cli.py to-hf", description=__doc__)
    p.add_argument("--ckpt", required=True, help="a .ckpt file, or a ZeRO / FSDP checkpoint folder (last.ckpt/)")
    p.add_argument("--base", required=True, help="HF folder with the policy's architecture and tokenizer")
    p.add_argument("--out", required=True, help="where to write the HF folder (float32 weights)")
    ns = p.parse_args(args)
    if Path(ns.out).exists() and (not Path(ns.out).is_dir() or any(Path(ns.out).iterdir())):
        raise CappoError(f"--out: {ns.out} exists and is not empty; nothing was overwritten")
    print(f"wrote {checkpoint_to_hf(ns.ckpt, ns.base, ns.out)}")
