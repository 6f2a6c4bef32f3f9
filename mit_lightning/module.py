"""The LightningModule: frozen LLM + frozen CLIP + trainable encoders, fusion and task head.

Composition, not inheritance: the fusion method (`fusion`) and the task head (`head`) are chosen
in the config by class path and built once the sizes are known. The frozen backbones are built in
`configure_model()` and never saved: checkpoints hold the trainable weights only (the run's config
says how to rebuild the rest).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from mit_lightning.backbones.llm import FrozenLLM, LLMConfig, LLMShape
from mit_lightning.backbones.sequence import SequenceEncoder
from mit_lightning.backbones.task_token import TaskToken
from mit_lightning.backbones.vision import FrozenCLIP, VisionConfig, VisionShape
from mit_lightning.data.base import DataSpec
from mit_lightning.errors import UserError
from mit_lightning.fusion.base import Fusion, FusionInputs, ModelDims
from mit_lightning.fusion.mit import MiT
from mit_lightning.heads.base import TaskHead

log = logging.getLogger(__name__)

#: submodules holding frozen weights: never trained, never saved
FROZEN_SUBMODULES = ("llm", "vision")


def is_trainable_key(name: str) -> bool:
    """The one predicate deciding what MiT trains and what checkpoints hold."""
    return name.split(".", 1)[0] not in FROZEN_SUBMODULES


@dataclass
class SequenceEncoderConfig:
    """The trainable encoders of non-image feature sequences (acoustic, facial).

    Args:
        width: size of the global vector each encoder produces.
        layers: transformer layers (3 in the paper).
        heads: attention heads.
        dropout: dropout inside the encoder.
    """

    width: int = 128
    layers: int = 3
    heads: int = 4
    dropout: float = 0.1


STAGE_PREFIX = {"validate": "val", "test": "test"}
#: the paper's optimizer (Adam, lr 4e-5); fused: one pass over the trainable weights per step, not one per operation
DEFAULT_OPTIMIZER = {"class_path": "torch.optim.Adam", "init_args": {"lr": 4e-5, "fused": True}}


class MiTModule(L.LightningModule):
    """Frozen LLM (+ frozen CLIP) with a trainable fusion method and task head.

    Args:
        head: the task head (class path), e.g. mit_lightning.heads.ReferringSegmentation.
        llm: the frozen LLM.
        vision: the frozen CLIP vision tower; null for text + sequence tasks.
        fusion: how the modalities reach the LLM (class path): MiT (default), TokenConcat, TextOnly, LateAddition.
        text_feature: where the text feature is read: at the prompt's last token (the paper's default), or at a
            learnable task token appended to every prompt (paper section 5.2; backward then runs through every
            decoder layer).
        sequence_modalities: feature sequences encoded by trainable encoders and fused (e.g. [audio, facial]).
        sequence_encoder: settings of those encoders.
        optimizer: optimizer over the trainable parameters only (default Adam, lr 4e-5, as the paper; fused).
        lr_scheduler: learning-rate schedule stepped per epoch (default ×0.1 every 10 epochs, as the paper).
    """

    def __init__(
        self,
        head: Callable[[ModelDims], TaskHead],
        llm: LLMConfig = LLMConfig(),
        vision: VisionConfig | None = None,
        fusion: Callable[[ModelDims], Fusion] = MiT,
        text_feature: Literal["last_token", "task_token"] = "last_token",
        sequence_modalities: list[str] | None = None,
        sequence_encoder: SequenceEncoderConfig = SequenceEncoderConfig(),
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.llm_config = llm
        self.vision_config = vision
        self.sequence_modalities = list(sequence_modalities or [])
        self.sequence_encoder_config = sequence_encoder
        self.fusion_factory = fusion
        self.text_feature = text_feature
        self.head_factory = head
        # partials, not lambdas: a copy or pickle of the module (EMA, spawn) keeps working
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, **DEFAULT_OPTIMIZER["init_args"])
        self.lr_scheduler_factory = lr_scheduler or partial(torch.optim.lr_scheduler.StepLR, step_size=10, gamma=0.1)
        # sizes from config files only: a missing weights path or a bad layer index fails here, at once
        self.llm_shape = LLMShape.from_hf_config(llm.hf_config())
        self.vision_shape = VisionShape.from_architecture(vision.architecture()) if vision else None
        if vision is not None:
            vision.weights_path()
        with torch.device("meta"):
            self.fusion_factory(self.dims(DataSpec()))
        self.strict_loading = False  # frozen weights are not in checkpoints; on_load_checkpoint checks the rest
        self.llm: FrozenLLM | None = None
        self.vision: FrozenCLIP | None = None
        self.sequence_encoders = nn.ModuleDict()
        self.fusion: Fusion | None = None
        self.task_token: TaskToken | None = None
        self.head: TaskHead | None = None
        self.eval_metrics = nn.ModuleDict()
        self._eval_splits: dict[str, list[str]] = {}
        self._skipped: list[str] = []

    # --- building -------------------------------------------------------------------------------
    @property
    def image_size(self) -> int | None:
        """The vision tower's input size; data modules resize images to it."""
        return self.vision_shape.image_size if self.vision_shape else None

    def dims(self, spec: DataSpec) -> ModelDims:
        vision = self.vision_shape
        vectors = {name: self.sequence_encoder_config.width for name in self.sequence_modalities}
        if vision is not None:
            vectors["image"] = vision.embed_dim
        return ModelDims(
            llm=self.llm_shape,
            vectors=vectors,
            vision_width=vision.width if vision else None,
            vision_depth=vision.depth if vision else None,
            vision_grid=vision.grid if vision else None,
            num_classes=spec.num_classes,
        )

    def configure_model(self) -> None:
        if self.llm is None:
            self.build(self._data_spec())

    def _data_spec(self) -> DataSpec:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "spec", None) or DataSpec()

    def build(self, spec: DataSpec) -> None:
        """Load the frozen backbones and create the trainable parts for this data."""
        missing = [name for name in self.sequence_modalities if name not in spec.sequence_dims]
        if missing:
            raise UserError(
                f"model.sequence_modalities asks for {missing}, but the data provides {sorted(spec.sequence_dims)}."
            )
        self.llm = FrozenLLM(self.llm_config)
        self.vision = FrozenCLIP(self.vision_config) if self.vision_config else None
        encoder = self.sequence_encoder_config
        self.sequence_encoders = nn.ModuleDict(
            {
                name: SequenceEncoder(
                    spec.sequence_dims[name], width=encoder.width, layers=encoder.layers, heads=encoder.heads,
                    dropout=encoder.dropout,
                )
                for name in self.sequence_modalities
            }
        )
        dims = self.dims(spec)
        self.fusion = self.fusion_factory(dims)
        self.fusion.attach(self.llm)
        if self.text_feature == "task_token":
            self.task_token = TaskToken(self.llm.model.get_input_embeddings())
        self.head = self.head_factory(dims)
        self._eval_splits = spec.eval_splits
        self.eval_metrics = nn.ModuleDict(
            {
                self._metrics_key(stage, index): self.head.make_metrics()
                for stage in STAGE_PREFIX
                for index, _ in enumerate(spec.eval_splits.get(stage, []) or [None])
            }
        )

    @property
    def vision_blocks(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.fusion.vision_blocks) | set(self.head.vision_blocks)))

    # --- parameters -----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if is_trainable_key(name) and p.requires_grad]

    def parameter_counts(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return trainable, sum(p.numel() for p in self.parameters())

    def on_fit_start(self) -> None:
        trainable, total = self.parameter_counts()
        percent = 100.0 * trainable / max(total, 1)
        rank_zero_info(f"Trainable parameters: {trainable:,} of {total:,} ({percent:.2f}%)")
        if self.logger is not None:
            self.logger.log_metrics({"params/trainable": trainable, "params/trainable_percent": percent}, step=0)

    # --- forward --------------------------------------------------------------------------------
    def encode_modalities(self, batch: dict[str, Any]) -> FusionInputs:
        vectors: dict[str, torch.Tensor] = {}
        tokens: dict[int, torch.Tensor] = {}
        if self.vision is not None:
            vision = self.vision(batch["image"], blocks=self.vision_blocks)
            vectors["image"], tokens = vision.embedding, vision.tokens
        for name, encoder in self.sequence_encoders.items():
            vectors[name] = encoder(batch[name], batch[f"{name}_mask"])
        return FusionInputs(vectors=vectors, vision_tokens=tokens)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs = self.encode_modalities(batch)
        input_ids, attention_mask = self.llm.tokenize(batch["prompt"], self.device)
        if self.task_token is not None:
            input_ids, attention_mask = self.task_token.append(input_ids, attention_mask)
        text = self.fusion(self.llm, input_ids, attention_mask, inputs)
        return self.head(text.float(), inputs)

    # --- steps ----------------------------------------------------------------------------------
    def _take_skipped(self, batch: dict[str, Any]) -> bool:
        """Record samples the data module dropped (unreadable images); False if nothing is left."""
        self._skipped.extend(batch.get("skipped", []))
        return len(batch["prompt"]) > 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if not self._take_skipped(batch):
            return None
        loss = self.head.loss(self(batch), batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        return loss

    def _evaluate(self, stage: str, batch: dict[str, Any], dataloader_idx: int) -> None:
        if not self._take_skipped(batch):
            return
        output = self(batch)
        name = self._metric_name(stage, dataloader_idx, "loss")
        self.log(name, self.head.loss(output, batch), batch_size=len(batch["prompt"]), add_dataloader_idx=False,
                 sync_dist=True)
        self.head.update_metrics(self.eval_metrics[self._metrics_key(stage, dataloader_idx)], output, batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("validate", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any] | None:
        if not self._take_skipped(batch):
            return None
        return self.head.predict(self(batch), batch)

    # --- epoch ends -----------------------------------------------------------------------------
    @staticmethod
    def _metrics_key(stage: str, index: int) -> str:
        return f"{stage}_{index}"

    def _metric_name(self, stage: str, index: int, metric: str) -> str:
        """val/<metric> for the first validation split, <stage>/<split>/<metric> otherwise."""
        splits = self._eval_splits.get(stage) or [None]
        split = splits[index] if index < len(splits) else str(index)
        if stage == "validate" and index == 0:
            return f"val/{metric}"
        return f"{STAGE_PREFIX[stage]}/{split}/{metric}"

    def _log_eval_metrics(self, stage: str) -> None:
        for index in range(len(self._eval_splits.get(stage) or [None])):
            metrics = self.eval_metrics[self._metrics_key(stage, index)]
            if not metrics[next(iter(metrics.keys()))].update_called:
                continue
            for name, value in _flatten(metrics.compute()).items():
                full_name = self._metric_name(stage, index, name)
                if value.numel() == 1:
                    self.log(full_name, value.float(), add_dataloader_idx=False)
                elif stage == "test":
                    self._log_matrix(full_name, value)
            metrics.reset()
        self._report_skipped(stage)

    def _log_matrix(self, name: str, matrix: torch.Tensor) -> None:
        from mit_lightning.metrics.classification import confusion_matrix_image

        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(name, confusion_matrix_image(matrix.cpu()), global_step=self.global_step)

    def _report_skipped(self, stage: str) -> None:
        if self._skipped:
            shown = ", ".join(self._skipped[:5])
            rank_zero_warn(
                f"{len(self._skipped)} {stage} samples were skipped because their image could not be read "
                f"(first: {shown}). Re-extract or remove those files."
            )
            self._skipped = []

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("validate")

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test")

    def on_train_epoch_end(self) -> None:
        self._report_skipped("training")

    # --- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # --- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_trainable_key(k)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint fits this model before Lightning loads it non-strictly.

        FSDP loads the weights itself before this hook and takes them out of `checkpoint`: then there
        is nothing left to check here (torch still refuses weights of another shape).
        """
        if "state_dict" not in checkpoint:
            return
        saved = checkpoint["state_dict"]
        expected = {k: v for k, v in self.state_dict().items() if is_trainable_key(k)}
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        mismatched = sorted(k for k in set(saved) & set(expected) if saved[k].shape != expected[k].shape)
        if missing or unexpected or mismatched:
            details = "; ".join(
                f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", mismatched))
                if keys
            )
            raise UserError(
                f"The checkpoint does not fit this model ({details}). It was trained with another model configuration: "
                "evaluate it with the config stored in it (mit test --ckpt_path ... without changing model.*)."
            )


def _flatten(results: dict[str, Any]) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for name, value in results.items():
        if isinstance(value, dict):
            flat.update(_flatten(value))
        else:
            flat[name] = value
    return flat
