"""What a checkpoint holds beyond the weights: the state an exact resume needs.

A mixin of ``RLModule`` (which owns ``objectives``, ``combiner``, ``skipped_updates``, ``references``
and ``policy_cfg``). Controllers change objective weights between steps, PCGrad's generator
advances, and the SRR baseline and the initial policy's probabilities of every valid answer cannot be
recomputed once training has moved the policy, so each is saved under a ``cappo_*`` key and restored on load.
"""

from __future__ import annotations

from typing import Any

from cappo_pl.evaluation import PromptSet
from cappo_pl.references import ReferenceSet


class RunState:
    """``on_save_checkpoint`` / ``on_load_checkpoint`` for ``RLModule`` (see the module docstring)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cappo_objective_weights"] = {o.name: o.weight for o in self.objectives}
        checkpoint["cappo_combiner"] = {"state": self.combiner.state_dict(), "skipped": self.skipped_updates}
        if self.references is not None:
            checkpoint["cappo_srr_references"] = self.references.state_dict()
        if self.eval_sets:  # pi_SFT of every valid answer and the hidden subsets (enumerable tasks)
            checkpoint["cappo_eval_sets"] = {split: ps.state_dict() for split, ps in self.eval_sets.items()}
        if self.policy_cfg.lora is not None:  # what `to-hf` needs to merge the adapters
            checkpoint["cappo_lora"] = {"r": self.policy_cfg.lora.r, "alpha": self.policy_cfg.lora.alpha}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.policy is None:
            self.setup("fit")
        for obj in self.objectives:
            obj.weight = checkpoint.get("cappo_objective_weights", {}).get(obj.name, obj.weight)
        combiner_state = checkpoint.get("cappo_combiner", {})
        self.combiner.load_state_dict(combiner_state.get("state", {}))
        self.skipped_updates = combiner_state.get("skipped", 0)
        if "cappo_srr_references" in checkpoint:  # the initial policy's scores cannot be recomputed later
            self.references = ReferenceSet.from_state(checkpoint["cappo_srr_references"])
            self._srr_resolved = False  # its quantile thresholds come from these scores
        if "cappo_eval_sets" in checkpoint:
            self.eval_sets = {split: PromptSet.from_state(s) for split, s in checkpoint["cappo_eval_sets"].items()}
            self._hidden_drawn = False  # S is drawn from the config of this run
        else:
            self._baseline_missing = True
