"""Trained models on new inputs: one image and text at a time, or in batches, several on one loaded LLM.

In a notebook (a checkpoint of `mit fit`, or a folder of `mit export`)::

    from mit_lightning import load_model

    model = load_model("runs/demo/tensorboard/version_0/checkpoints/best-epoch=11.ckpt")
    model.predict(image="photo.png", text="the red circle")["mask"]     # segmentation: bool (H, W)
    model.predict(image="dish.jpg", text="Grilled lemon chicken")         # classification: label, probabilities
    model.predict(text="I loved it", audio=audio, facial=facial)          # sentiment: score; arrays (steps, features)
    model.predict_batch([{"image": "a.png", "text": "the red circle"}, ...], batch_size=8)   # many, in batches
    load_model("best", config="configs/demo.yaml")                        # the newest run's best checkpoint

Inputs are prepared as the data modules prepare a dataset's samples: the prompt by the run's
`PromptFormat`, the image square-resized to the vision tower's size (`to_square_tensor`), feature
sequences with their masks; masks come back at the image's own size, by the rule evaluation uses.

Several trained models on one backbone (`load_adapters`, used by `mit serve`): MiT installs a tap in
each infused LLM layer and a layer takes one tap, so two MiT adapters cannot be installed at once.
`SharedBackbones` loads the LLM and CLIP once and keeps which adapter's fusion (and task token) is
installed; running another adapter swaps them (`MiTModule.detach_from_llm` / `attach_to_llm`: hooks
only, no weights move). Callers run
batches of one adapter at a time, from one thread. A fusion that changes the LLM itself (e.g. LoRA
weights inside it) cannot share it: detaching it must leave the LLM exactly as loaded, else it is
refused unless served alone.
"""

from __future__ import annotations

import copy
import io
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence, get_args

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.nn import functional as F

from mit_lightning.adapters import Adapter, read_adapter
from mit_lightning.backbones.fingerprint import check_same_backbones
from mit_lightning.backbones.llm import FrozenLLM
from mit_lightning.backbones.vision import FrozenCLIP
from mit_lightning.compiling import Compile
from mit_lightning.compute_dtype import inference_dtype
from mit_lightning.data.base import collate
from mit_lightning.data.images import DECODE_ERRORS, ImageTooLarge, load_rgb, to_square_tensor
from mit_lightning.errors import UserError, user_error_in
from mit_lightning.heads.base import Task
from mit_lightning.module import MiTModule

#: bounds on one input, so that a single request cannot take the memory or time of all others
MAX_TEXT_CHARACTERS = 4000
MAX_SEQUENCE_STEPS = 10_000
MAX_IMAGE_PIXELS = 40_000_000
#: backbone settings that may differ between adapters sharing one loaded backbone: where the files are and
#: which ones (compared by fingerprint instead), and training-only memory settings
SHAREABLE_SETTINGS = {"path", "weights", "name", "seed", "activation_checkpointing"}
BACKBONE_HINT = ("Serve it with the backbones it was trained on (--llm_path, --clip_weights), or add "
                 "--allow_other_backbones to use it on these deliberately.")


class InputError(UserError):
    """An input the model cannot read; the message says what was wrong and what to send instead."""


class InputTooLarge(InputError):
    """An input over the size limits."""


class NonFiniteOutput(InputError):
    """The model's output for an input is NaN or infinite: the input lies far outside what it was trained on."""


NON_FINITE_OUTPUT = ("The model's output for this input is not a finite number (NaN or infinite): its values lie far "
                     "outside what the model was trained on (e.g. features of magnitude 1e30). Send values in the range "
                     "of the training data.")


@dataclass
class Sample:
    """One input: the text (an expression, a caption, an utterance), the image, feature sequences (steps, features)."""

    text: str
    image: Image.Image | None = None
    sequences: dict[str, np.ndarray] = field(default_factory=dict)


def read_image(source: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A path, encoded bytes, a PIL image or an (H, W, 3) uint8 array, as an RGB image."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        if (source.dtype != np.uint8 or source.ndim not in (2, 3) or 0 in source.shape
                or (source.ndim == 3 and source.shape[2] not in (3, 4))):
            raise InputError(f"An image array must be uint8 (H, W, 3), (H, W, 4) or (H, W); got {source.dtype} "
                             f"{source.shape}.")
        if source.shape[0] * source.shape[1] > max_pixels:
            raise InputTooLarge(f"The image array is {source.shape[1]}×{source.shape[0]} pixels, more than the "
                                f"{max_pixels:,} accepted. Send a smaller image.")
        return Image.fromarray(source).convert("RGB")
    what = f"'{source}'" if isinstance(source, (str, os.PathLike)) else "the upload"
    try:
        return load_rgb(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source, max_pixels)
    except (ImageTooLarge, Image.DecompressionBombError) as error:
        raise InputTooLarge(f"The image {what} is too large: {error}. Send a smaller image.") from None
    except DECODE_ERRORS as error:
        raise InputError(f"{what[0].upper() + what[1:]} is not an image that can be read (PNG, JPEG, ...): "
                         f"{_decode_problem(error)}.") from None


def _decode_problem(error: Exception) -> str:
    """What went wrong reading an image, in words: no Python object reprs (``<_io.BytesIO object at 0x...>``)."""
    if isinstance(error, UnidentifiedImageError):
        return "its format is not recognised"
    message = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(error).splitlines()[0] if str(error) else "").strip()
    return message or type(error).__name__


def precision_context(precision: str | None, device: torch.device) -> Any:
    """The autocast a run trained under (``bf16-mixed``, ``16-mixed``); nothing for full precision."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class Predictor:
    """One trained model on its frozen backbones: `predict` for one input, `run` for a batch."""

    def __init__(self, name: str, module: MiTModule, backbones: "SharedBackbones", source: Path,
                 precision: str | None = None) -> None:
        self.name = name
        self.module = module
        self.backbones = backbones
        self.source = source
        self.precision = precision
        self.task = module.head.task
        self.spec = module.data_spec
        self.image_size = module.image_size
        self.sequence_dims = {name: self.spec.sequence_dims[name] for name in module.sequence_modalities}

    @property
    def class_names(self) -> list[str] | None:
        if self.task != "classification":
            return None
        return list(self.spec.class_names or [str(index) for index in range(self.module.head.num_classes)])

    def describe(self, paths: bool = False) -> dict[str, Any]:
        """What a client needs to know to send inputs: the task, which inputs, their sizes, the classes. The
        source is the checkpoint's or export's name, its local path only with `paths`."""
        return {
            "name": self.name,
            "task": self.task,
            "source": str(self.source) if paths else self.source.name,
            "fusion": type(self.module.fusion).__name__,
            "head": type(self.module.head).__name__,
            "image": self.image_size is not None,
            "image_size": self.image_size,
            "sequences": dict(self.sequence_dims),
            "classes": self.class_names,
            "prompt_template": self.spec.prompt.template,
        }

    # --- inputs -----------------------------------------------------------------------------------
    def check(self, sample: Sample) -> Sample:
        """The sample as the model reads it (feature arrays as float32), or an `InputError` saying what is wrong."""
        if not isinstance(sample.text, str) or not sample.text.strip():
            raise InputError("The text is empty: send the expression or sentence the model should read.")
        if len(sample.text) > MAX_TEXT_CHARACTERS:
            raise InputTooLarge(f"The text has {len(sample.text):,} characters, more than the {MAX_TEXT_CHARACTERS:,} "
                                "accepted. Send a shorter text.")
        if self.image_size is not None and sample.image is None:
            raise InputError(f"'{self.name}' ({self.task}) reads an image with the text: send one.")
        if self.image_size is None and sample.image is not None:
            raise InputError(f"'{self.name}' ({self.task}) reads no image; send only the text and feature sequences.")
        unknown = sorted(set(sample.sequences) - set(self.sequence_dims))
        missing = sorted(set(self.sequence_dims) - set(sample.sequences))
        if unknown or missing:
            expected = ", ".join(f"{name} (steps, {size})" for name, size in self.sequence_dims.items()) or "none"
            raise InputError(f"'{self.name}' reads the feature sequences {expected}; "
                             f"{'missing: ' + ', '.join(missing) if missing else 'unknown: ' + ', '.join(unknown)}.")
        sequences = {name: self._sequence(name, value) for name, value in sample.sequences.items()}
        return Sample(text=sample.text, image=sample.image, sequences=sequences)

    def _sequence(self, name: str, value: Any) -> np.ndarray:
        size = self.sequence_dims[name]
        try:
            array = np.asarray(value)
            if array.dtype.kind not in "iuf":  # text, booleans, objects: no number was sent
                raise TypeError(array.dtype)
            with np.errstate(over="ignore"):
                array = array.astype(np.float32)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"'{name}' is not an array of numbers; send a list of {size}-number rows.") from None
        if array.ndim != 2 or array.shape[1] != size or array.shape[0] < 1:
            raise InputError(f"'{name}' has shape {array.shape}; expected (steps, {size}) with at least one step.")
        if array.shape[0] > MAX_SEQUENCE_STEPS:
            raise InputTooLarge(f"'{name}' has {array.shape[0]:,} steps, more than the {MAX_SEQUENCE_STEPS:,} accepted.")
        if not np.isfinite(array).all():
            raise InputError(f"'{name}' holds NaN or infinite values, or values beyond ±3.4e38 (float32); replace them "
                             "(the datasets use 0 for missing values).")
        return array

    def prepare(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """A batch in the data modules' contract (`mit_lightning.data.base`), on the model's device."""
        steps = {name: max(sample.sequences[name].shape[0] for sample in samples) for name in self.sequence_dims}
        resized: dict[int, torch.Tensor] = {}  # one image with several expressions is resized once
        items = []
        for index, sample in enumerate(samples):
            item: dict[str, Any] = {"prompt": self.spec.prompt.fill(sample.text), "index": index}
            if self.image_size is not None:
                if id(sample.image) not in resized:
                    resized[id(sample.image)] = to_square_tensor(sample.image, self.image_size)
                item["image"] = resized[id(sample.image)]
            for name, length in steps.items():
                features = torch.from_numpy(sample.sequences[name])
                item[name] = F.pad(features, (0, 0, 0, length - features.shape[0]))
                item[f"{name}_mask"] = torch.arange(length) < features.shape[0]
            items.append(item)
        device = self.module.device
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value
                for key, value in collate(items).items()}

    # --- running ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        """Results for checked samples (`check`), in one forward pass: keep batches to a size the device holds."""
        self.backbones.activate(self.module)
        batch = self.prepare(samples)
        with precision_context(self.precision, self.module.device):
            output = self.module(batch)
        sizes = [(sample.image.height, sample.image.width) for sample in samples] if self.image_size is not None else None
        results = self.module.head.answers(output, image_sizes=sizes, class_names=self.class_names)
        finite = torch.isfinite(output.float().reshape(len(samples), -1)).all(dim=1).tolist()
        return [{"prompt": prompt, **result} if ok else NonFiniteOutput(NON_FINITE_OUTPUT)
                for prompt, result, ok in zip(batch["prompt"], results, finite)]

    def predict(self, image: Any = None, text: str | None = None, **sequences: Any) -> dict[str, Any]:
        """One input. Segmentation: ``mask`` (bool numpy array at the image's size); classification:
        ``label``, ``label_index``, ``probabilities`` (class name → probability); sentiment: ``score``.
        Segmentation also gives ``confidence`` (the mean foreground probability over the mask) and ``probability``
        (the foreground probability per pixel, float32 at the image's size)."""
        return answer(self.run([self._sample(image, text, sequences)])[0])

    def predict_batch(self, inputs: Iterable[dict[str, Any]], batch_size: int = 8) -> list[dict[str, Any]]:
        """Many inputs, `batch_size` per forward pass; each a dict of `predict`'s arguments (``image``, ``text``,
        feature sequences by name). Results in the same order, as `predict` gives them; an output that is not finite
        raises, as in `predict`."""
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}.")
        samples = [self._sample(item.get("image"), item.get("text"),
                                {key: value for key, value in item.items() if key not in ("image", "text")})
                   for item in inputs]
        return [answer(result) for start in range(0, len(samples), batch_size)
                for result in self.run(samples[start:start + batch_size])]

    def _sample(self, image: Any, text: str | None, sequences: dict[str, Any]) -> Sample:
        return self.check(Sample(text=text, image=read_image(image) if image is not None else None, sequences=sequences))


def answer(result: dict[str, Any] | InputError) -> dict[str, Any]:
    """A sample's result from `Predictor.run`, or the error it stands for (an output that is not finite)."""
    if isinstance(result, InputError):
        raise result
    return result


# --- several adapters on one backbone -------------------------------------------------------------------
def llm_signature(llm: FrozenLLM) -> tuple:
    """What a fusion must leave as it found it in the LLM: its modules, parameters and hooks."""
    return (
        tuple(name for name, _ in llm.named_modules()),
        tuple(name for name, _ in llm.named_parameters()),
        tuple(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in llm.modules()),
    )


class SharedBackbones:
    """The frozen LLM and CLIP, loaded once, and the one model whose hooks are installed in the LLM now."""

    def __init__(self) -> None:
        self.llm: FrozenLLM | None = None
        self.vision: FrozenCLIP | None = None
        self.active: MiTModule | None = None

    def activate(self, module: MiTModule) -> None:
        """Install `module`'s fusion and task token in the LLM (after taking out those installed): a swap of
        hooks, no weights move."""
        if self.active is module:
            return
        self._deactivate()
        module.attach_to_llm()
        self.active = module

    def _deactivate(self) -> None:
        """Take the installed model's hooks out of the LLM, leaving it as loaded."""
        if self.active is not None:
            self.active.detach_from_llm()
        self.active = None

    def build(self, module: MiTModule, adapter: Adapter, name: str, shared: bool) -> None:
        """Build `module` on these backbones (loading them with the first one). With `shared`, its hooks are
        taken out again at once, and must leave the LLM as loaded."""
        if self.llm is None:
            self.llm = FrozenLLM(module.llm_config)
        _check_same_settings(self.llm.config, module.llm_config, "LLM", name)
        vision = None
        if module.vision_config is not None:
            self.vision = self.vision or FrozenCLIP(module.vision_config)
            _check_same_settings(self.vision.config, module.vision_config, "vision tower", name)
            vision = self.vision
        self._deactivate()
        before = llm_signature(self.llm)
        module.build(adapter.data_spec, llm=self.llm, vision=vision)  # installs its fusion (and task token)
        self.active = module
        if not shared:
            return
        self._deactivate()
        if llm_signature(self.llm) != before:
            raise UserError(
                f"'{name}' uses {type(module.fusion).__name__}, which changes the frozen LLM itself (its layers, weights "
                "or hooks stay changed after detach()), so it cannot share the LLM with other adapters. Serve it alone."
            )


def _check_same_settings(loaded: Any, wanted: Any, what: str, name: str) -> None:
    differing = [f"{item.name}={getattr(wanted, item.name)!r} (loaded: {getattr(loaded, item.name)!r})"
                 for item in fields(wanted)
                 if item.name not in SHAREABLE_SETTINGS and getattr(wanted, item.name) != getattr(loaded, item.name)]
    if differing:
        raise UserError(f"'{name}' was trained with the {what} set up otherwise than the one loaded for the adapters "
                        f"before it: {', '.join(differing)}. Serve it in a `mit serve` of its own.")


def build_module(adapter: Adapter, llm_path: str | None = None, clip_weights: str | None = None,
                 compile: Compile | None = None) -> MiTModule:
    """The module an adapter was trained as (nothing loaded yet), from its model config; the backbones'
    locations can be replaced (the same files elsewhere: their fingerprints are checked on loading), and
    `compile` replaces how it was compiled (`model.compile`)."""
    from jsonargparse import ArgumentParser
    from jsonargparse import ArgumentError

    model = copy.deepcopy(adapter.model)
    if llm_path is not None:
        model["llm"] = {**(model.get("llm") or {}), "path": str(llm_path)}
    if clip_weights is not None and model.get("vision"):
        model["vision"]["weights"] = str(clip_weights)
    if compile is not None:
        model["compile"] = compile
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MiTModule, "model", fail_untyped=False, sub_configs=True)
    try:
        return parser.instantiate(parser.parse_object({"model": model})).model
    except (ArgumentError, ValueError, TypeError) as error:
        cause = user_error_in(error)
        if cause is not None:
            raise cause from None
        raise UserError(f"The model config of '{adapter.source}' cannot be built with this mit-lightning: "
                        f"{str(error).splitlines()[0]}") from None


def _unique_name(wanted: str, taken: dict[str, Any]) -> str:
    """URL-safe and not taken yet: `demo`, `demo-2`, ..."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", wanted).strip("-.") or "adapter"
    name, number = base, 1
    while name in taken:
        number += 1
        name = f"{base}-{number}"
    return name


def load_adapters(
    sources: Sequence[str | os.PathLike | Adapter | tuple[str, str | os.PathLike]],
    *,
    device: str | torch.device | None = None,
    llm_path: str | None = None,
    clip_weights: str | None = None,
    allow_other_backbones: bool = False,
    compile: Compile | None = None,
    user_args: Sequence[str] = (),
) -> dict[str, Predictor]:
    """Load checkpoints or exports as adapters on one LLM (and CLIP), by name.

    A source is a path, an `Adapter`, or a (name, path) pair. `llm_path` / `clip_weights` replace where
    the backbones are read from; a model trained on other backbones (by fingerprint) is refused unless
    `allow_other_backbones`. `compile` compiles the models (`model.compile`: "default", "reduce-overhead", ...)
    whatever they were trained with; None keeps their setting. `user_args`: the user's command line, whose class names stored configs may use.
    A model trained in bf16-mixed runs under bf16 autocast, its own weights cast to bf16 once (`mit_lightning.compute_dtype`).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbones = SharedBackbones()
    predictors: dict[str, Predictor] = {}
    for source in sources:
        wanted, source = source if isinstance(source, tuple) else (None, source)
        adapter = source if isinstance(source, Adapter) else read_adapter(source, user_args)
        name = _unique_name(wanted or adapter.name, predictors)
        module = build_module(adapter, llm_path, clip_weights, compile)
        backbones.build(module, adapter, name, shared=len(sources) > 1)
        if module.head.task is None:
            raise UserError(f"'{name}' has a {type(module.head).__name__} head, which has no use on new inputs yet "
                            f"(tasks: {', '.join(get_args(Task))}).")
        if module.data_spec.prompt is None:
            raise UserError(f"'{adapter.source}' does not record how its prompts were written (data.prompt_template).")
        if adapter.backbones and not allow_other_backbones:
            check_same_backbones(adapter.backbones, module.backbones, f"'{adapter.source}'", BACKBONE_HINT)
        module.load_trainable_state(adapter.weights, "The checkpoint")
        module.to(device).eval()
        module.cast_trainable(inference_dtype(adapter.precision))  # once here, not at every forward pass
        predictors[name] = Predictor(name, module, backbones, adapter.source, adapter.precision)
    return predictors


def load_model(path: str | os.PathLike, config: str | os.PathLike | Sequence[str | os.PathLike] = (),
               **options: Any) -> Predictor:
    """A checkpoint of `mit fit` or a folder of `mit export`, ready to `predict`; options as `load_adapters`.

    ``load_model("best", config="configs/demo.yaml")`` (or ``"last"``) loads that checkpoint of the newest run
    of the config, as ``mit serve --config configs/demo.yaml --ckpt_path best`` does.
    """
    if str(path) in ("best", "last"):
        from mit_lightning.cli import find_checkpoint  # the run folders are where the config's trainer puts them

        configs = [config] if isinstance(config, (str, os.PathLike)) else list(config)
        path = find_checkpoint(str(path), [str(item) for item in configs])
    return next(iter(load_adapters([path], **options).values()))
