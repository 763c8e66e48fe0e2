"""The `analysis:` config section: the LLM.int8() criteria, the MoE view's rules and the scan
actors. No Polars here: loading a config imports this, not the analysis."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from common.config import build, positive
from common.errors import ConfigError
from common.record import RunRecord

LAYER_UNITS = ["layer", "site"]


@dataclass(frozen=True)
class Criteria:
    """When a hidden dim is an outlier feature (the `analysis:` config section holds these).

    A dim is an outlier feature when all three hold:
      max_abs >= threshold, layer share >= min_layer_fraction, token_fraction >= min_token_fraction.

    Each outlier feature is then classified:
      "systematic" when its layer share >= systematic_layer_fraction AND its
      token_fraction >= systematic_token_fraction, otherwise "probabilistic".
    Why these defaults (75% of layers, half of the tokens): LLM.int8() reports that past
    the emergence phase shift (about 6.7B parameters) outlier features affect all layers
    and about 75% of sequence dimensions, in the same dims throughout: systematic. Before
    it they show up in some layers and a minority of tokens, each occurrence a matter of
    chance: probabilistic. The bars sit between those two regimes.
    """

    threshold: float = 6.0
    """Magnitude at or above which an entry counts as an outlier (|x| >= threshold)."""
    min_layer_fraction: float = 0.25
    """Least share of layers (or layer-sites, see layer_unit) a feature must reach."""
    min_token_fraction: float = 0.06
    """Least share of captured tokens in which a feature must reach the threshold."""
    layer_unit: str = "layer"
    """'layer': share of decoder layers (the paper's definition); 'site': share of
    (layer, site) pairs out of 2L, as earlier tools counted."""
    systematic_layer_fraction: float = 0.75
    """Least layer share (same unit as layer_unit) of a 'systematic' feature."""
    systematic_token_fraction: float = 0.5
    """Least token_fraction of a 'systematic' feature."""

    def __post_init__(self):
        number = self.threshold
        if not _is_number(number) or not math.isfinite(number) or number <= 0:
            raise ConfigError(
                f"analysis.threshold={number!r}: choose a finite number > 0 (LLM.int8() uses 6.0)"
            )
        for name in (
            "min_layer_fraction",
            "min_token_fraction",
            "systematic_layer_fraction",
            "systematic_token_fraction",
        ):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value <= 1:
                raise ConfigError(f"analysis.{name}={value!r}: choose a fraction in [0, 1]")
        if self.layer_unit not in LAYER_UNITS:
            raise ConfigError(
                f"analysis.layer_unit={self.layer_unit!r}: choose one of {LAYER_UNITS}"
            )

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def layer_column(self) -> str:
        """The per-dim column the layer criteria read."""
        return f"{self.layer_unit}_fraction"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class AnalysisConfig(Criteria):
    """The `analysis:` config section: the criteria, the MoE view's rules, and how many scan
    actors apply them. The MoE view's defaults are its papers' (analysis.experts, .massive)."""

    num_actors: int = 2
    """Polars scan actors; layer-sites are split between them."""
    scan_actors_from_mb: float = 256.0
    """Runs whose tables are smaller are scanned in the driver: an actor's start costs more."""
    super_expert_percentile: float = 99.5
    """A super expert's max |output| exceeds this percentile of every routed expert's."""
    super_expert_fraction: float = 0.1
    """... and this fraction of the largest one."""
    super_expert_layers: float = 0.75
    """... and its layer lies in this first share of the layers."""
    massive_threshold: float = 100.0
    """A massive residual value has |x| above this ..."""
    massive_ratio: float = 1000.0
    """... and at least this many times its layer's median |x|."""
    bootstrap_resamples: int = 1000
    """Resamples of the sequences for the confidence intervals."""
    bootstrap_seed: int = 0
    confidence: float = 0.95
    """Coverage of the confidence intervals."""

    def __post_init__(self):
        super().__post_init__()
        positive("analysis.num_actors", self.num_actors)
        positive("analysis.bootstrap_resamples", self.bootstrap_resamples)
        if self.scan_actors_from_mb < 0:
            raise ConfigError(f"analysis.scan_actors_from_mb={self.scan_actors_from_mb!r}: choose 0 or more")
        for name in ("super_expert_fraction", "super_expert_layers", "confidence"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"analysis.{name}={getattr(self, name)!r}: choose a fraction in (0, 1]")
        if not 0 <= self.super_expert_percentile <= 100:
            raise ConfigError(f"analysis.super_expert_percentile={self.super_expert_percentile!r}: choose 0-100")

    def criteria(self) -> Criteria:
        return Criteria(**{f.name: getattr(self, f.name) for f in fields(Criteria)})


def run_settings(record: RunRecord) -> AnalysisConfig:
    """The analysis section recorded in the run's configuration, defaults elsewhere."""
    return build(AnalysisConfig, record.section("analysis"), "analysis")


def run_criteria(record: RunRecord) -> Criteria:
    """The criteria recorded in the run's configuration, defaults elsewhere."""
    return run_settings(record).criteria()
