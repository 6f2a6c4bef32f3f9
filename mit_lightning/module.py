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
from typing import Any, Callable, Collection, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from mit_lightning.batch import Batch
from mit_lightning.backbones.fingerprint import llm_fingerprint, vision_fingerprint
from mit_lightning.backbones.llm import FrozenLLM, LLMConfig, LLMShape
from mit_lightning.backbones.lora import lora_parameter_names
from mit_lightning.backbones.sequence import SequenceEncoder
from mit_lightning.backbones.task_token import TaskToken
from mit_lightning.backbones.vision import FrozenCLIP, VisionConfig, VisionShape
from mit_lightning.checkpoints import (
    BACKBONES_ENTRY,
    DATA_SPEC_ENTRY,
    check_recorded_backbones,
    check_trainable_fit,
    load_weights_file,
)
from mit_lightning.compiling import Compile, compile_model, pad_to_bucket
from mit_lightning.compute_dtype import cast_parameters
from mit_lightning.data.base import DataSpec
from mit_lightning.errors import UserError, check_choice, expand_env
from mit_lightning.fusion.base import Fusion, FusionInputs, ModelDims
from mit_lightning.fusion.mit import MiT
from mit_lightning.heads.base import TaskHead
from mit_lightning.master_weights import MasterWeights
from mit_lightning.metrics.evaluation import EvaluationMetrics, SkippedSamples

log = logging.getLogger(__name__)

#: submodules holding frozen weights: never trained, never saved
FROZEN_SUBMODULES = ("llm", "vision")


def is_trainable_key(name: str, lora: Collection[str] = ()) -> bool:
    """The one predicate deciding what trains and what checkpoints hold.

    Everything outside the frozen backbones, plus `lora`: the names of the LoRA weights a fusion method added
    inside them (`MiTModule.lora_names`).
    """
    return name.split(".", 1)[0] not in FROZEN_SUBMODULES or name in lora


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


#: where the text feature is read: the prompt's last token (the paper) or a trained task token
TextFeature = Literal["last_token", "task_token"]
#: the dtype of the trainable weights: float32, or bfloat16 with float32 master copies in the optimizer
TrainableDType = Literal["float32", "bfloat16"]
#: batch keys every prediction row carries, to join it back to its dataset: ids, the text the model read, the
#: true label where the data has one (segmentation's ground truth is the mask, summarised by the row's IoU)
PREDICTION_PASSTHROUGH = ("index", "ref_id", "sent_id", "id", "image_path", "sentence", "text", "prompt", "label")
#: the paper's optimizer (Adam, lr 4e-5); fused: one pass over the trainable weights per step, not one per operation
DEFAULT_OPTIMIZER = {"class_path": "torch.optim.Adam", "init_args": {"lr": 4e-5, "fused": True}}
#: the paper's schedule: the learning rate ×0.1 every 10 epochs
DEFAULT_LR_SCHEDULER = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 10, "gamma": 0.1}}


class MiTModule(L.LightningModule):
    """Frozen LLM (+ frozen CLIP) with a trainable fusion method and task head.

    Args:
        head: the task head (class path), e.g. mit_lightning.heads.ReferringSegmentation.
        llm: the frozen LLM.
        vision: the frozen CLIP vision tower; null for text + sequence tasks.
        fusion: how the modalities reach the LLM (class path): MiT (default), TokenConcat, PILL, ModeX, TextOnly,
            LateAddition.
        text_feature: where the text feature is read: at the prompt's last token (the paper's default), or at a
            learnable task token appended to every prompt (paper section 5.2; backward then runs through every
            decoder layer).
        sequence_modalities: feature sequences encoded by trainable encoders and fused (e.g. [audio, facial]).
        sequence_encoder: settings of those encoders.
        optimizer: optimizer over the trainable parameters only (default Adam, lr 4e-5, as the paper; fused).
        lr_scheduler: learning-rate schedule stepped per epoch (default ×0.1 every 10 epochs, as the paper), or
            per optimizer step for a schedule that says so (`interval = "step"`, e.g. mit_lightning.schedules.WarmupCosine).
        init_weights: a checkpoint written by `mit fit` whose trainable weights this run starts from, with a fresh
            optimizer at epoch 0 (e.g. PILL stage 2 from stage 1). Read when fitting starts; a checkpoint given to
            `--ckpt_path` (resuming, testing) takes precedence.
        allow_other_backbones: use a checkpoint on frozen backbones other than those it was trained on
            (refused by default: checkpoints record which LLM and CLIP they were trained on).
        head_lr_scale: the head's learning rate as a multiple of the optimizer's (the authors' release
            trains its segmentation decoder at 0.1×); other than 1, the head gets a parameter group of
            its own, named "head" (the rest: "other").
        compile: torch.compile the frozen LLM's decoder layers (with the fusion's taps), the CLIP blocks and the
            head (`mit_lightning.compiling`): "default" (inductor), "reduce-overhead" (also CUDA graphs),
            "max-autotune"; "none" runs eagerly. Compiled, the text is padded to a multiple of 16 tokens.
        trainable_dtype: "bfloat16" keeps the trainable weights in bf16 (normalisation layers excepted) so
            that bf16 autocast has none to cast, while the optimizer updates float32 master copies
            (`mit_lightning.master_weights`); checkpoints hold the float32 copies. Needs
            `trainer.precision: bf16-mixed`.
    """

    def __init__(
        self,
        head: Callable[[ModelDims], TaskHead],
        llm: LLMConfig = LLMConfig(),
        vision: VisionConfig | None = None,
        fusion: Callable[[ModelDims], Fusion] = MiT,
        text_feature: TextFeature = "last_token",
        sequence_modalities: list[str] | None = None,
        sequence_encoder: SequenceEncoderConfig = SequenceEncoderConfig(),
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        init_weights: str | None = None,
        allow_other_backbones: bool = False,
        head_lr_scale: float = 1.0,
        compile: Compile = "none",
        trainable_dtype: TrainableDType = "float32",
    ) -> None:
        super().__init__()
        check_choice("model.text_feature", text_feature, TextFeature)
        check_choice("model.compile", compile, Compile)
        check_choice("model.trainable_dtype", trainable_dtype, TrainableDType)
        self.trainable_dtype = trainable_dtype
        self.compile_mode = compile  # not `self.compile`: that is nn.Module's method
        self.init_weights = init_weights
        if not head_lr_scale > 0:
            raise UserError(
                f"model.head_lr_scale must be a positive multiple of the learning rate, got {head_lr_scale}."
            )
        self.head_lr_scale = head_lr_scale
        self.llm_config = llm
        self.vision_config = vision
        self.sequence_modalities = list(sequence_modalities or [])
        self.sequence_encoder_config = sequence_encoder
        self.allow_other_backbones = allow_other_backbones
        self.backbones: dict[str, Any] = {}
        self.data_spec: DataSpec | None = None
        self.fusion_factory = fusion
        self.text_feature = text_feature
        self.head_factory = head
        # partials, not lambdas: a copy or pickle of the module (EMA, spawn) keeps working
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, **DEFAULT_OPTIMIZER["init_args"])
        self.lr_scheduler_factory = lr_scheduler or partial(
            torch.optim.lr_scheduler.StepLR, **DEFAULT_LR_SCHEDULER["init_args"]
        )
        # sizes from config files only: a missing weights path or a bad layer index fails here, at once
        self.llm_shape = LLMShape.from_hf_config(llm.hf_config())
        self.vision_shape = VisionShape.from_architecture(vision.architecture()) if vision else None
        if vision is not None:
            vision.weights_path()
        with torch.device("meta"):  # the trainable parts' settings fail here, before minutes of loading weights
            # the class count and the sequences' feature sizes come from the data later: any value checks the rest
            placeholder = self.dims(
                DataSpec(num_classes=2, sequence_dims=dict.fromkeys(self.sequence_modalities, 1))
            )
            self.fusion_factory(placeholder)
            self.head_factory(placeholder)
        self.strict_loading = False  # frozen weights are not in checkpoints; on_load_checkpoint checks the rest
        self.llm: FrozenLLM | None = None
        self.vision: FrozenCLIP | None = None
        self.sequence_encoders = nn.ModuleDict()
        self.fusion: Fusion | None = None
        self.task_token: TaskToken | None = None
        self.head: TaskHead | None = None
        self.eval_metrics = EvaluationMetrics()
        self._skipped = SkippedSamples()
        self._cut_prompts = {True: 0, False: 0}  # prompts cut to the token limit, in training and in evaluation
        self._master_weights: MasterWeights | None = None
        self._full_precision: dict[str, torch.Tensor] = {}  # a checkpoint's float32 values of bf16 weights

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
            sequences={name: spec.sequence_dims[name] for name in self.sequence_modalities if name in spec.sequence_dims},
            vision_width=vision.width if vision else None,
            vision_depth=vision.depth if vision else None,
            vision_grid=vision.grid if vision else None,
            vision_patch=vision.patch_size if vision else None,
            num_classes=spec.num_classes,
        )

    def configure_model(self) -> None:
        if self._trainer is not None:
            self._check_trainer()
        if self.llm is None:
            self.build(self._data_spec())
            if self.init_weights and self._trainer is not None and self._trainer.state.fn == "fit":
                self.load_trainable_weights(self.init_weights)

    def _check_trainer(self) -> None:
        if self.trainable_dtype == "float32":
            return
        if self._trainer.precision != "bf16-mixed":
            raise UserError(f"model.trainable_dtype {self.trainable_dtype} runs under bf16 autocast, but "
                            f"trainer.precision is {self._trainer.precision}: set --trainer.precision bf16-mixed, "
                            "or model.trainable_dtype float32.")
        if isinstance(self._trainer.strategy, FSDPStrategy):
            raise UserError("model.trainable_dtype bfloat16 is for single-device and DDP runs; FSDP keeps its own "
                            "parameter dtypes (its mixed_precision setting): use model.trainable_dtype float32.")

    def _data_spec(self) -> DataSpec:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "spec", None) or DataSpec()

    def build(self, spec: DataSpec, llm: FrozenLLM | None = None, vision: FrozenCLIP | None = None) -> None:
        """Load the frozen backbones and create the trainable parts for this data.

        `llm` / `vision`: backbones already loaded (several trained models served on one LLM); they
        are used as they are, and recorded as the backbones this module runs on.
        """
        missing = [name for name in self.sequence_modalities if name not in spec.sequence_dims]
        if missing:
            raise UserError(
                f"model.sequence_modalities asks for {missing}, but the data provides {sorted(spec.sequence_dims)}."
            )
        self.llm = llm or FrozenLLM(self.llm_config)
        self.vision = (vision or FrozenCLIP(self.vision_config)) if self.vision_config else None
        self.backbones = {
            "llm": llm_fingerprint(self.llm.config),
            "vision": vision_fingerprint(self.vision.config if self.vision is not None else None),
        }
        self.data_spec = spec
        dims = self.dims(spec)
        self.fusion = self.fusion_factory(dims)
        self.fusion.attach(self.llm)
        encoder = self.sequence_encoder_config
        self.sequence_encoders = nn.ModuleDict(
            {
                name: SequenceEncoder(
                    spec.sequence_dims[name], width=encoder.width, layers=encoder.layers, heads=encoder.heads,
                    dropout=encoder.dropout,
                )
                for name in (self.sequence_modalities if self.fusion.needs_sequence_vectors else [])
            }
        )
        if self.text_feature == "task_token":
            self.task_token = TaskToken(self.llm.model.get_input_embeddings())
        self.head = self.head_factory(dims)
        self.eval_metrics = EvaluationMetrics(self.head.make_metrics, spec.eval_splits)
        if self.trainable_dtype == "bfloat16":
            self.cast_trainable(torch.bfloat16)
        compile_model(self, self.compile_mode)

    @property
    def vision_blocks(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.fusion.vision_blocks) | set(self.head.vision_blocks)))

    # --- parameters -----------------------------------------------------------------------------
    def lora_names(self) -> set[str]:
        """Names of the LoRA weights a fusion method added inside the frozen LLM."""
        return lora_parameter_names(self.llm, prefix="llm") if self.llm is not None else set()

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        lora = self.lora_names()
        return [(name, p) for name, p in self.named_parameters() if is_trainable_key(name, lora) and p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for _, parameter in self.named_trainable_parameters()]

    def cast_trainable(self, dtype: torch.dtype | None) -> None:
        """The trainable weights in `dtype`, normalisation layers' excepted (`mit_lightning.compute_dtype`); None
        leaves them as they are."""
        if dtype is not None:
            cast_parameters(self, set(self.trainable_state()), dtype)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What checkpoints hold: the state of everything that is not frozen (trainable or not in this stage)."""
        lora = self.lora_names()
        return {name: value for name, value in self.state_dict().items() if is_trainable_key(name, lora)}

    def parameter_counts(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return trainable, sum(p.numel() for p in self.parameters())

    def on_fit_start(self) -> None:
        trainable, total = self.parameter_counts()
        percent = 100.0 * trainable / max(total, 1)
        rank_zero_info(f"Trainable parameters: {trainable:,} of {total:,} ({percent:.2f}%)")

    def attach_to_llm(self) -> None:
        """Install this model's hooks in the frozen LLM (its fusion, its task token): models served on one
        LLM take turns (`inference.SharedBackbones`)."""
        self.fusion.attach(self.llm)
        if self.task_token is not None:
            self.task_token.attach(self.llm.model.get_input_embeddings())

    def detach_from_llm(self) -> None:
        """Take this model's hooks out of the frozen LLM again."""
        self.fusion.detach()
        if self.task_token is not None:
            self.task_token.detach()

    # --- forward --------------------------------------------------------------------------------
    def encode_modalities(self, batch: Batch) -> FusionInputs:
        vectors: dict[str, torch.Tensor] = {}
        inputs = FusionInputs(vectors=vectors)
        if self.vision is not None:
            vision = self.vision(batch["image"], blocks=self.vision_blocks)
            vectors["image"] = vision.embedding
            inputs.vision_tokens, inputs.vision_class_tokens = vision.tokens, vision.class_tokens
        for name, encoder in self.sequence_encoders.items():
            vectors[name] = encoder(batch[name], batch[f"{name}_mask"])
        inputs.sequences = {name: batch[name] for name in self.sequence_modalities}
        inputs.sequence_masks = {name: batch[f"{name}_mask"] for name in self.sequence_modalities}
        return inputs

    def forward(self, batch: Batch) -> torch.Tensor:
        inputs = self.encode_modalities(batch)
        input_ids, attention_mask = self.llm.tokenize(batch["prompt"], self.device)
        self._cut_prompts[self.training] += self.llm.take_cut_prompts()
        if self.task_token is not None:
            input_ids, attention_mask = self.task_token.append(input_ids, attention_mask)
        if self.compile_mode != "none":  # a few fixed text lengths, not one graph per length
            tokenizer = self.llm.tokenizer
            input_ids, attention_mask = pad_to_bucket(input_ids, attention_mask, tokenizer.pad_token_id,
                                                      tokenizer.padding_side)
        text = self.fusion(self.llm, input_ids, attention_mask, inputs)
        return self.head(text.float(), inputs)

    # --- steps ----------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        if not self._skipped.take(batch):
            return None
        loss = self.head.loss(self(batch), batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        return loss

    def _evaluate(self, stage: str, batch: Batch, dataloader_idx: int) -> None:
        if not self._skipped.take(batch):
            return
        output = self(batch)
        name = self.eval_metrics.name(stage, dataloader_idx, "loss")
        self.log(name, self.head.loss(output, batch), batch_size=len(batch["prompt"]), add_dataloader_idx=False,
                 sync_dist=True)
        self.head.update_metrics(self.eval_metrics.collection(stage, dataloader_idx), output, batch)

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("validate", batch, dataloader_idx)

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any] | None:
        if not self._skipped.take(batch):
            return None
        passed = {key: batch[key] for key in PREDICTION_PASSTHROUGH if key in batch}
        return {**passed, **self.head.predict(self(batch), batch)}

    # --- epoch ends -----------------------------------------------------------------------------
    def _log_eval_metrics(self, stage: str) -> None:
        for name, value in self.eval_metrics.results(stage):
            if value.numel() == 1:
                self.log(name, value.float(), add_dataloader_idx=False)
            elif stage == "test":
                self._log_matrix(name, value)
        self._report_skipped(stage)

    def _log_matrix(self, name: str, matrix: torch.Tensor) -> None:
        from mit_lightning.metrics.classification import confusion_matrix_image

        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(name, confusion_matrix_image(matrix.cpu()), global_step=self.global_step)

    def _report_skipped(self, stage: str) -> None:
        """What this stage's epoch dropped (unreadable samples) or cut (prompts over the token limit), once."""
        stage = {"validate": "validation"}.get(stage, stage)
        message = self._skipped.report(stage)
        if message is not None:
            rank_zero_warn(message)
        cut, self._cut_prompts[stage == "training"] = self._cut_prompts[stage == "training"], 0
        if cut:
            limit = self.llm_config.max_text_tokens
            rank_zero_warn(f"{cut} {stage} prompts were longer than model.llm.max_text_tokens ({limit} tokens) and lost "
                           "their beginning (prompts are cut from the left, so the task's end stays). Raise "
                           "model.llm.max_text_tokens to keep them whole.")

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("validate")

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test")

    def on_train_epoch_end(self) -> None:
        self._report_skipped("training")

    def on_predict_epoch_end(self) -> None:
        self._report_skipped("prediction")

    # --- optimisation ---------------------------------------------------------------------------
    def parameter_groups(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        """The trainable parameters, split into "other" and "head" groups when the head has its own rate."""
        if self.head_lr_scale == 1.0:
            return self.trainable_parameters()
        head = {id(parameter) for parameter in self.head.parameters()}
        groups = {"other": [], "head": []}
        for parameter in self.trainable_parameters():
            groups["head" if id(parameter) in head else "other"].append(parameter)
        return [{"name": name, "params": params} for name, params in groups.items() if params]

    def configure_optimizers(self):
        groups = self.parameter_groups()
        if self.trainable_dtype != "float32":
            # full precision from a checkpoint just loaded, else from the copies of an earlier fit of this module
            initial = self._full_precision or (self._master_weights.state() if self._master_weights else {})
            if self._master_weights is not None:
                self._master_weights.detach()
            self._master_weights = masters = MasterWeights(self.named_trainable_parameters(), initial)
            self._full_precision = {}
            groups = masters.optimized_groups(groups)
        optimizer = self.optimizer_factory(groups)
        trainer = self._trainer
        if (trainer is not None and trainer.gradient_clip_val and str(trainer.precision).endswith("-mixed")
                and optimizer.defaults.get("fused")):
            raise UserError(f"trainer.gradient_clip_val under trainer.precision {trainer.precision} needs an optimizer "
                            "that is not fused (Lightning refuses to clip then): add --model.optimizer.fused false.")
        if self._master_weights is not None:
            self._master_weights.attach(optimizer)
        for group in optimizer.param_groups:  # before the scheduler reads the initial rates
            if group.get("name") == "head":
                group["lr"] = group["lr"] * self.head_lr_scale
        scheduler = self.lr_scheduler_factory(optimizer)
        if hasattr(scheduler, "set_total_steps"):  # a schedule over the run's length (WarmupCosine)
            scheduler.set_total_steps(self.trainer.estimated_stepping_batches)
        interval = getattr(scheduler, "interval", "epoch")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._master_weights is not None:  # before clipping, which reads the optimizer's parameters
            self._master_weights.take_gradients()

    # --- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        lora = self.lora_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_trainable_key(k, lora)}
        if self._master_weights is not None:  # the float32 values, not their bf16 rounding
            checkpoint["state_dict"].update(self._master_weights.state())
        checkpoint[BACKBONES_ENTRY] = self.backbones
        if self.data_spec is not None:
            checkpoint[DATA_SPEC_ENTRY] = self.data_spec.to_record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint fits this model before Lightning loads it non-strictly.

        FSDP loads the weights itself before this hook and takes them out of `checkpoint`: then there
        is nothing left to check here (torch still refuses weights of another shape).
        """
        check_recorded_backbones(checkpoint, self.backbones, "The checkpoint", self.allow_other_backbones)
        if "state_dict" not in checkpoint:
            return
        check_trainable_fit(checkpoint["state_dict"], self.trainable_state(), "The checkpoint")
        self._remember_full_precision(checkpoint["state_dict"])

    def load_trainable_weights(self, path: str) -> None:
        """Start from the trainable weights of a `mit fit` checkpoint (`init_weights`); nothing else is restored."""
        path = expand_env(path)
        checkpoint = load_weights_file(path, "init_weights checkpoint")
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise UserError(f"model.init_weights '{path}' holds no state_dict: give a .ckpt file written by `mit fit`.")
        saved = checkpoint["state_dict"]
        check_recorded_backbones(checkpoint, self.backbones, f"model.init_weights '{path}'", self.allow_other_backbones)
        self.load_trainable_state(saved, f"model.init_weights '{path}'")
        self._remember_full_precision(saved)
        rank_zero_info(f"Trainable weights initialised from {path} ({len(saved)} tensors); optimizer and epoch start afresh.")

    def load_trainable_state(self, saved: dict[str, torch.Tensor], source: str) -> None:
        """Load trainable weights that must be exactly this model's (key for key, shape for shape; `source` names
        them in the error); the frozen backbones are not in them."""
        check_trainable_fit(saved, self.trainable_state(), source)
        self.load_state_dict(saved, strict=False)

    def _remember_full_precision(self, saved: dict[str, torch.Tensor]) -> None:
        """Keep the float32 values of weights this model holds in bf16, for the optimizer's master copies."""
        if self.trainable_dtype != "float32":
            parameters = dict(self.named_parameters())
            self._full_precision = {name: value for name, value in saved.items()
                                    if name in parameters and parameters[name].dtype != value.dtype}
