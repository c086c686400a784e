"""Lightning callbacks: weight controllers, the sample table, the run summary, the HF export, graceful Ctrl-C."""

from cappo_pl.callbacks.control import WeightController
from cappo_pl.callbacks.entropy import EntropyController, StepEntropyController
from cappo_pl.callbacks.export import ExportHF, export_hf
from cappo_pl.callbacks.interrupt import GracefulInterrupt
from cappo_pl.callbacks.kl import AdaptiveKLController
from cappo_pl.callbacks.sample_table import SampleTable
from cappo_pl.callbacks.summary import RunSummary

__all__ = [
    "AdaptiveKLController",
    "EntropyController",
    "ExportHF",
    "GracefulInterrupt",
    "RunSummary",
    "SampleTable",
    "StepEntropyController",
    "WeightController",
    "export_hf",
]
