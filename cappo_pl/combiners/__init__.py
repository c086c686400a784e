"""Gradient combiners: ``combiner(gram, weights) -> c``; the update is ``sum_k c_k grad L_k``."""

from cappo_pl.combiners.base import Combiner
from cappo_pl.combiners.cagrad import CAGrad
from cappo_pl.combiners.mgda import MGDA
from cappo_pl.combiners.pcgrad import PCGrad
from cappo_pl.combiners.scalarized import Scalarized
from cappo_pl.combiners.upgrad import UPGrad

__all__ = ["CAGrad", "Combiner", "MGDA", "PCGrad", "Scalarized", "UPGrad"]
