"""How the other modalities reach the frozen LLM: MiT infusion and the methods it is compared with.

Every fusion method has the same interface (`Fusion`) and is chosen in the config by class path:
`mit_lightning.fusion.MiT`, `TokenConcat`, `PILL`, `ModeX`, `TextOnly`, `LateAddition`. The
token-based ones (`TokenConcat`, `PILL`, `ModeX`) take LoRA on the frozen LLM as an option.
"""

from mit_lightning.fusion.base import Fusion, FusionInputs, ModelDims
from mit_lightning.fusion.concat import TokenConcat
from mit_lightning.fusion.mit import MiT
from mit_lightning.fusion.modex import ModeX
from mit_lightning.fusion.pill import PILL
from mit_lightning.fusion.simple import LateAddition, TextOnly

__all__ = [
    "Fusion", "FusionInputs", "ModelDims", "MiT", "TokenConcat", "PILL", "ModeX", "TextOnly", "LateAddition",
]
