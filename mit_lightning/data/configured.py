"""A data module built from a run's `data` config alone, without the model: how `mit check-data` looks at the
data before training and `mit inspect` reads a trained model's validation samples."""

from __future__ import annotations

from typing import Any

from mit_lightning.data.base import MiTDataModule
from mit_lightning.errors import UserError, user_error_in


def build_datamodule(data: dict[str, Any], image_size: int | None = None) -> MiTDataModule:
    """The data module `data` ({class_path, init_args}) names, its class path checked by the caller.

    `image_size`: the vision tower's input size, for a data module whose data.image_size is unset (in a run the
    model tells it; here there is none)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(MiTDataModule, "data")
    try:
        datamodule = parser.instantiate(parser.parse_object({"data": data})).data
    except (UserError, ValueError, TypeError) as error:
        cause = user_error_in(error)
        if cause is not None:
            raise cause from None
        raise UserError(f"The data config cannot be built: {str(error).splitlines()[0]}") from None
    if getattr(datamodule, "image_size", 0) is None and image_size is not None:
        datamodule.image_size = image_size
    return datamodule
