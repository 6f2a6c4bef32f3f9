"""The strategies `mit bench` measures: the fusions of the `configs/peers/` overlays, as `mit compare` runs them.

One source per strategy: a strategy is its overlay's `model.fusion` (class and settings), built at the bench's
scale (a fusion with a `layers` setting infuses the scale's layers). `VARIANTS` adds a measured setting an overlay
does not have, by what it changes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from mit_lightning.errors import UserError
from mit_lightning.fusion.base import Fusion, ModelDims
from mit_lightning.scales import Scale

PEERS = Path("configs/peers")
#: variant → (the overlay it starts from, the fusion settings it changes). PILL reads 32 tokens in its overlays
#: (a learned-query resampler, as its Q-Former); on every patch token its cost is the other regime.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"pill_stage2_all_patches": ("pill_stage2", {"tokens": None})}


@dataclass(frozen=True)
class Strategy:
    name: str
    fusion: dict[str, Any]  # class_path and init_args, as an overlay writes them
    changes: dict[str, Any] = field(default_factory=dict)

    def factory(self, scale: Scale) -> Callable[[ModelDims], Fusion]:
        """The fusion factory MiTModule takes, with the overlay's settings, at `scale`."""
        from jsonargparse import ArgumentParser

        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--fusion", type=Callable[[ModelDims], Fusion])
        try:
            config = parser.parse_object({"fusion": self.fusion})
        except Exception as error:  # jsonargparse says what is wrong in its own words
            raise UserError(f"Strategy '{self.name}': its model.fusion cannot be built: {error}") from None
        settings = config.fusion.get("init_args")  # None for a fusion without settings (TextOnly)
        if settings is not None:
            for key, value in self.changes.items():
                settings[key] = value
            if "layers" in settings:
                settings["layers"] = list(scale.layers)
        return parser.instantiate(config).fusion


def read_strategies(folder: Path = PEERS) -> dict[str, Strategy]:
    """Every overlay in `folder` that chooses a fusion, by file stem (MiT first), then the variants of those."""
    if not folder.is_dir():
        raise UserError(f"No strategy folder at '{folder}': run from the repository root, or give --peers.")
    found: dict[str, Strategy] = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            fusion = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("fusion")
        except (OSError, yaml.YAMLError, AttributeError) as error:
            raise UserError(f"Cannot read the strategy overlay '{path}': {error}") from None
        if isinstance(fusion, dict) and "class_path" in fusion:
            found[path.stem] = Strategy(path.stem, fusion)
    for name, (base, changes) in VARIANTS.items():
        if base in found:
            found[name] = Strategy(name, found[base].fusion, changes)
    if "mit" not in found:
        raise UserError(f"'{folder}' has no mit.yaml: every ratio of the bench refers to MiT.")
    return dict(sorted(found.items(), key=lambda item: (item[0] != "mit", item[0])))
