"""mit-lightning: Multimodal Infusion Tuning (MiT) for frozen LLMs, as a Lightning application.

Paper: "Multimodal Infusion Tuning for Large Models" (Sun, Song, Yu, Liu, Chen, Lin).
"""

__version__ = "0.1.0"
