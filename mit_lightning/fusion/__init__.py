"""How the other modalities reach the frozen LLM: MiT infusion and the methods it is compared with.

Every fusion method has the same interface (`Fusion`) and is chosen in the config by class path:
`mit_lightning.fusion.MiT`, `TokenConcat`, `TextOnly`, `LateAddition`.
"""

from mit_lightning.fusion.base import Fusion, FusionInputs, ModelDims
from mit_lightning.fusion.concat import TokenConcat
from mit_lightning.fusion.mit import MiT
from mit_lightning.fusion.simple import LateAddition, TextOnly

__all__ = ["Fusion", "FusionInputs", "ModelDims", "MiT", "TokenConcat", "TextOnly", "LateAddition"]
