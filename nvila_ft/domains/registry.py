"""The domain packs, one row each: what a domain adds to nvila-ft (its sources, metrics, baselines and built-in
generators). This table is the one place domains are enumerated: a new domain is a folder
`nvila_ft/domains/<name>/` and one row here (plus, for users, a task YAML naming its source and metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nvila_ft import metrics as generic
from nvila_ft.domains.general.generators import make_scenes_dataset, make_shapes_dataset
from nvila_ft.domains.grounding import metrics as grounding_metrics
from nvila_ft.domains.grounding.baselines import mean_box
from nvila_ft.domains.grounding.generator import make_grounding_dataset
from nvila_ft.domains.grounding.referring import GroundingData
from nvila_ft.domains.medical import metrics as medical_metrics
from nvila_ft.domains.medical.generator import make_scan_dataset
from nvila_ft.domains.medical.sources import MedicalVQA
from nvila_ft.domains.preference.generator import make_preference_dataset
from nvila_ft.domains.preference.sources import PreferenceJson
from nvila_ft.domains.robotics import metrics as robotics_metrics
from nvila_ft.domains.robotics.episodes import RobotEpisodes
from nvila_ft.domains.robotics.generators import make_robot_video_dataset
from nvila_ft.domains.synthetic import Generator

# A baseline: one answer for every validation question from the training answers, or None where it does not apply.
Baseline = Callable[[Sequence[str]], str | None]


@dataclass(frozen=True)
class Domain:
    """One domain pack: its data sources (task YAMLs name them as `_target_`), its metrics by name, its image-blind
    baselines by name, and its built-in datasets by name (`BuiltinData(dataset=...)`)."""

    name: str
    sources: tuple[type, ...] = ()
    metrics: Mapping[str, generic.Metric] = field(default_factory=dict)
    baselines: Mapping[str, Baseline] = field(default_factory=dict)
    generators: Mapping[str, Generator] = field(default_factory=dict)


DOMAINS: tuple[Domain, ...] = (
    Domain("general", generators={"shapes": Generator(make_shapes_dataset), "scenes": Generator(make_scenes_dataset)}),
    Domain("medical", sources=(MedicalVQA,), metrics=medical_metrics.METRICS,
           generators={"scan": Generator(make_scan_dataset)}),
    Domain("robotics", sources=(RobotEpisodes,), metrics=robotics_metrics.METRICS,
           generators={"robot_video": Generator(make_robot_video_dataset)}),
    Domain("grounding", sources=(GroundingData,), metrics=grounding_metrics.METRICS, baselines={"mean_box": mean_box},
           generators={"grounding": Generator(make_grounding_dataset)}),
    Domain("preference", sources=(PreferenceJson,),
           generators={"preference": Generator(make_preference_dataset, reader=PreferenceJson)}),
)


def _merged(part: str) -> dict[str, Any]:
    """Every domain's `part` (metrics, baselines, generators) in one mapping; a name two domains give is an error."""
    out: dict[str, Any] = {}
    for domain in DOMAINS:
        for name, value in getattr(domain, part).items():
            if name in out:
                raise ValueError(f"domain {domain.name}: {part[:-1]} {name!r} is already another domain's")
            out[name] = value
    return out


METRICS: dict[str, generic.Metric] = {**generic.METRICS, **_merged("metrics")}  # what task.metrics may name
BASELINES: dict[str, Baseline] = _merged("baselines")
GENERATORS: dict[str, Generator] = _merged("generators")
SOURCES: tuple[type, ...] = tuple(source for domain in DOMAINS for source in domain.sources)
