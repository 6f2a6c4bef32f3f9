"""`mit bench`: what MiT costs on top of the frozen backbones, next to the other fusion strategies.

One run builds the model at one scale (`mit_lightning.scales`) and measures, for the same batch
sizes and text length (prompts are cut to exactly `--text-length` tokens, so batches have no
padding):

- floor: what any method built on the frozen backbones pays: the CLIP forward without grad (global
  feature and the decoder's blocks), tokenising, and the frozen LLM's forward plus a backward that
  starts where MiT's graph starts: the hidden state entering the first infused layer is made to
  require grad and the sum of the last token's final hidden state is backpropagated (no weight
  gradients, nothing below that layer).
- mit_train: one real training step of `MiTModule`: `training_step` (CLIP, tokenising, the infused
  LLM, segmentation head, DICE loss), backward and the Adam step of `configure_optimizers`.
- <strategy>_train: the same step with another fusion strategy (an overlay of `configs/peers/`), e.g.
  concat_train with `TokenConcat`: every CLIP patch token is prepended to the text, so the graph
  runs through all layers over patches + text.
- mit_inference: the MiT forward without grad, at batch 1 (latency) and at each batch size
  (throughput).
- data_loading: batches of `RefCOCODataModule`'s training DataLoader with worker processes, on a
  synthetic dataset in the refer layout written to a temporary folder (removed afterwards).
- <case>@<mode> (`--compile`): floor, mit_train and mit_inference again with the model compiled in that
  mode (`mit_lightning.compiling`), the floor on the same compiled layers.
- ratios (last line): each strategy's training step over the floor, each peer's over MiT's (time)
  and MiT's peak memory over each peer's, per batch size, the compiled figures per mode; and at 7b on
  a GPU the targets per compile mode (also printed on stderr as met / NOT met / not measured).

Timing: `--warmup` untimed steps, then the median of `--steps` steps, each between two
`torch.cuda.synchronize()` on a GPU; the floor's and MiT's training steps alternate, so a change in
the machine's load affects both alike. On a CPU each case also reports its CPU time per step
(`cpu_ms`) and the ratios are given from it too (`..._cpu`): on a shared machine, with `--threads 1`,
those are the steady figures. Data loading reports the mean over its timed batches (workers deliver
them in bursts). On a GPU, steps run under bf16 autocast, like `precision: bf16-mixed` (`--precision`).
Each case also reports its casts and kernel launches, counted in one more call under torch.profiler
(`measure.count_operations`). `--scale 7b --device cpu` counts them at the 7B structure without a GPU
(MiT only, batch 8, one timed step per case, bf16 autocast like the GPU run): casts are the ones a
GPU run makes; a CPU's operator calls stand for its launches, and its times say nothing of a GPU's, so
no target is checked. Peak memory:
over a case's warm-up steps (see `measure.py`); data loading reports none (it happens in the worker
processes).

Modules: `measure` (timing, counts), `cases` (the steps), `strategies` (read from the overlays), `report` (JSON
lines, ratios, targets), `cli` (arguments and the run).
"""

from mit_lightning.bench.cli import main

__all__ = ["main"]
