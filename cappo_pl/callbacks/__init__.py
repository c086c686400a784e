"""Lightning callbacks."""

from cappo_pl.callbacks.sample_table import SampleTable
from cappo_pl.callbacks.summary import RunSummary

__all__ = ["RunSummary", "SampleTable"]
