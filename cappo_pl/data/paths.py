"""PathTask: find a path between two nodes of a fixed random layered DAG (many correct answers).

The graph (seeded) has ``n_layers`` layers of ``nodes_per_layer`` nodes; node ``l * nodes_per_layer + i``
(the i-th of layer l) is named by its two-digit number (``"00"`` .. ``"59"`` for 6 x 10), so names
are in layer order and tokenize as two characters. Edges only join consecutive layers: every node of
layer l < n_layers - 1 has ``out_degree`` distinct successors drawn uniformly from layer l + 1 (no
dead ends); so every path from s to t has the same length, one node per layer between them.

Prompt ``"07 41:"``, completion the node sequence ``"07 12 30 41"`` (single spaces). The prompts
are the pairs (s, t) at least two layers apart with ``min_paths`` to ``max_paths`` paths. A seeded
fraction of them is held out (unseen pairs). Following ALPINE (Wang et al. 2024, "ALPINE: unveiling
the planning capability of autoregressive learning"), a transformer trained on paths learns the
adjacency and the *observed* reachability (u, t: u precedes t on a training path, or u -> t is an
edge), and plans by stepping to a successor that observably reaches the target. So a pair is held out
only if s has a successor u with (u, t) observed reachable in the training data (the references of the
training pairs and the edges): held-out pairs test that composition, not recall of unseen facts.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Annotated, Any

from annotated_types import Interval

from cappo_pl.constraints import PositiveFloat, PositiveInt, checked_init
from cappo_pl.data.records import Record
from cappo_pl.data.skew import zipf_draw
from cappo_pl.data.tasks import Task
from cappo_pl.errors import ConfigError
from cappo_pl.rewards.base import RewardFn, RewardFunction
from cappo_pl.seeds import derive_seed

Edge = tuple[str, str]


def _ordered_pairs(nodes: list[str]) -> set[Edge]:
    """Every (a, b) with a before b in ``nodes``: what a path shows to be reachable."""
    return {(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1 :]}


class PathReward(RewardFunction):
    """1.0 iff the completion is a node sequence from ``s`` to ``t`` along edges of the graph, else 0.0.

    The completion is stripped of surrounding whitespace and split on single spaces (a double space
    or any other separator gives an empty or unknown node, hence 0.0). ``s`` and ``t`` come from the
    records' ``extra`` fields, one per sample.
    """

    def __init__(self, edges: frozenset[Edge]) -> None:
        self.edges = edges

    def is_path(self, text: str, s: str, t: str) -> bool:
        """Whether ``text`` is a path from ``s`` to ``t``."""
        nodes = text.strip().split(" ")
        return (
            len(nodes) >= 2
            and nodes[0] == s
            and nodes[-1] == t
            and all((a, b) in self.edges for a, b in zip(nodes, nodes[1:], strict=False))
        )

    def __call__(self, prompts: list[str], completions: list[str], s: list[str], t: list[str], **_: Any) -> list[float]:
        return [float(self.is_path(c, a, b)) for c, a, b in zip(completions, s, t, strict=True)]


class PathTask(Task):
    """Paths in a seeded layered DAG: prompt ``"s t:"``, completion ``"s u ... t"`` (see the module doc).

    Training pairs get ``references_per_pair`` Zipf-skewed draws (with repeats) of their paths; held-out
    pairs get the same kind of draw, used only as SRR references. ``sft_records()`` adds every edge
    u -> v as a one-hop example (prompt ``"u v:"``, reference ``"u v"``). The task is enumerable:
    ``valid_completions(record)`` lists every path.

    Args:
        n_layers: layers of the DAG.
        nodes_per_layer: nodes per layer (n_layers * nodes_per_layer <= 100: two-digit names).
        out_degree: successors of every node outside the last layer (<= nodes_per_layer).
        min_paths: fewest paths a prompt pair has.
        max_paths: most paths a prompt pair has.
        references_per_pair: SFT reference draws per pair.
        zipf_exponent: the Zipf exponent of the reference draw (``cappo_pl.data.skew.zipf_draw``).
        val_fraction: fraction of the pairs held out (fewer if not enough pairs meet the ALPINE test).
        seed: seed of the graph, the references and the split.

    """

    @checked_init
    def __init__(
        self,
        n_layers: Annotated[int, Interval(ge=3, le=20)] = 6,
        nodes_per_layer: Annotated[int, Interval(ge=2, le=50)] = 8,
        out_degree: PositiveInt = 3,
        min_paths: PositiveInt = 5,
        max_paths: PositiveInt = 50,
        references_per_pair: PositiveInt = 16,
        zipf_exponent: PositiveFloat = 1.0,
        val_fraction: Annotated[float, Interval(ge=0, lt=1)] = 0.2,
        seed: int = 0,
    ) -> None:
        if n_layers * nodes_per_layer > 100:
            raise ConfigError(
                f"PathTask: n_layers * nodes_per_layer must be <= 100 (two-digit names), got "
                f"{n_layers} * {nodes_per_layer}"
            )
        if out_degree > nodes_per_layer:
            raise ConfigError(f"PathTask.out_degree: must be <= nodes_per_layer ({nodes_per_layer}), got {out_degree}")
        if min_paths > max_paths:
            raise ConfigError(f"PathTask: need min_paths <= max_paths, got {min_paths} > {max_paths}")
        self.n_layers, self.nodes_per_layer, self.out_degree = n_layers, nodes_per_layer, out_degree
        self.min_paths, self.max_paths, self.references_per_pair = min_paths, max_paths, references_per_pair
        self.zipf_exponent, self.val_fraction, self.seed = zipf_exponent, val_fraction, seed
        self.layers = [[f"{k * nodes_per_layer + i:02d}" for i in range(nodes_per_layer)] for k in range(n_layers)]
        rng = random.Random(derive_seed(seed, "path_graph"))
        self.successors: dict[str, list[str]] = {v: [] for layer in self.layers for v in layer}
        for here, nxt in zip(self.layers, self.layers[1:], strict=False):
            for u in here:
                self.successors[u] = sorted(rng.sample(nxt, out_degree))
        self.edges: frozenset[Edge] = frozenset((u, v) for u, vs in self.successors.items() for v in vs)
        self._build()

    def paths(self, s: str, t: str) -> list[str]:
        """Every path from ``s`` to ``t``, as completion strings, in lexicographic order."""
        layer_t = int(t) // self.nodes_per_layer
        out: list[str] = []

        def walk(prefix: list[str]) -> None:
            u = prefix[-1]
            if u == t:
                out.append(" ".join(prefix))
            elif int(u) // self.nodes_per_layer < layer_t:
                for v in self.successors[u]:
                    walk([*prefix, v])

        walk([s])
        return out

    def _build(self) -> None:
        pairs = [
            (s, t)
            for k, layer in enumerate(self.layers)
            for s in layer
            for later in self.layers[k + 2 :]
            for t in later
        ]
        paths = {p: self.paths(*p) for p in pairs}
        pairs = [p for p in pairs if self.min_paths <= len(paths[p]) <= self.max_paths]
        if not pairs:
            raise ConfigError(f"PathTask: no pair has {self.min_paths}..{self.max_paths} paths; change the graph")
        ref_rng = random.Random(derive_seed(self.seed, "path_references"))
        refs = {p: zipf_draw(paths[p], self.references_per_pair, self.zipf_exponent, ref_rng) for p in pairs}
        held = self._split(pairs, refs)
        self._records: dict[str, list[Record]] = {"train": [], "val": []}
        for i, (s, t) in enumerate(pairs):
            rec = Record(
                prompt=f"{s} {t}:",
                references=refs[(s, t)],
                extra={"s": s, "t": t, "n_paths": len(paths[(s, t)])},
                source=f"builtin:path#{i}",
            )
            self._records["val" if (s, t) in held else "train"].append(rec)
        self._edge_records = [
            Record(
                prompt=f"{u} {v}:",
                references=[f"{u} {v}"],
                extra={"s": u, "t": v, "n_paths": 1},
                source=f"builtin:path-edge#{j}",
            )
            for j, (u, v) in enumerate(sorted(self.edges))
        ]

    def _split(self, pairs: list[Edge], refs: dict[Edge, list[str]]) -> set[Edge]:
        """The held-out pairs: a seeded shuffle, taken greedily while every held-out pair passes the ALPINE test."""
        witnessed = {p: {x for r in set(refs[p]) for x in _ordered_pairs(r.split(" "))} for p in pairs}
        observed = Counter(x for p in pairs for x in witnessed[p])  # (u, t) -> training pairs witnessing it

        def plannable(s: str, t: str) -> bool:
            return any((u, t) in self.edges or observed[(u, t)] > 0 for u in self.successors[s])

        order = list(pairs)
        random.Random(derive_seed(self.seed, "path_split")).shuffle(order)
        want, held = round(self.val_fraction * len(pairs)), set()
        for p in order:
            if len(held) >= want:
                break
            observed.subtract(witnessed[p])
            if all(plannable(*q) for q in [*held, p]):
                held.add(p)
            else:
                observed.update(witnessed[p])
        return held

    def train_records(self) -> list[Record]:
        return self._records["train"]

    def val_records(self) -> list[Record]:
        return self._records["val"]

    def sft_records(self) -> list[Record]:
        """The training pairs' records plus every edge as a one-hop example."""
        return self._records["train"] + self._edge_records

    def reward_fn(self) -> RewardFn:
        return PathReward(self.edges)

    def valid_completions(self, record: Record) -> list[str]:
        """Every path from the record's ``s`` to its ``t``."""
        return self.paths(record.extra["s"], record.extra["t"])
