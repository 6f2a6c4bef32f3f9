"""mit-lightning: Multimodal Infusion Tuning (MiT) for frozen LLMs, as a Lightning application.

Paper: "Multimodal Infusion Tuning for Large Models" (Sun, Song, Yu, Liu, Chen, Lin).

`mit_lightning.load_model(path)` loads a trained model (checkpoint or export) for use on new inputs;
see `mit_lightning.inference`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`load_model` is imported on first use: `import mit_lightning` stays light."""
    if name == "load_model":
        from mit_lightning.inference import load_model

        return load_model
    raise AttributeError(f"module 'mit_lightning' has no attribute '{name}'")
