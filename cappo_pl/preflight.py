"""Everything a run reads, resolved before Lightning creates its run folder (``before_fit`` of the CLI).

Lightning writes ``runs/<name>/version_N/config.yaml`` in its setup hooks, and the data, the reward and the
SFT warm start used to be read only after that: a typo in a path left a run folder behind and a traceback.
Here every input is read and checked first, so a bad one is a one-line error and nothing is written.
"""

from __future__ import annotations

from typing import Any

from cappo_pl.data.records import source_file
from cappo_pl.errors import DataError


def check_inputs(module: Any, datamodule: Any) -> None:
    """Read the data (every record and prompt length), resolve the reward, check the SFT warm start has data.

    The model folder (``model.policy.path``) and the config were checked when the module was built.

    Raises:
        DataError: a bad data file, or SFT without any reference completion (names the file and field).
        RewardError: a reward function that cannot be found or imported.

    """
    datamodule.check_records(module.tokenizer)
    datamodule.task.reward_fn()
    cfg = module.policy_cfg
    train = module.sft_records(datamodule)
    if cfg.path is None and cfg.sft is not None and not any(r.references for r in train):
        raise DataError(
            f"{source_file(train[0].source)}: the SFT warm start (model.policy.sft) needs reference completions, "
            "but no record has field 'references' (add them, or set model.policy.sft=null to start from random "
            "weights, or model.policy.path to a trained model)"
        )
