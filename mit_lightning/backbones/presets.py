"""Randomly initialised backbones built locally, with no download.

- `tiny*`: 4-layer, 64-wide decoders (LLaMA, Mistral, Qwen2) and a 4-block CLIP: tests and the
  demo run on a CPU with them.
- `random-llama-2-7b`, `random-llama-2-13b`: the paper's shapes with random weights, for
  benchmarks of speed and memory on a GPU.
- `random-llama-16x1024`: a LLaMA-shaped 16-layer, 1024-wide decoder with random weights, for
  benchmarks on a CPU where the frozen LLM still dominates a training step.

Frozen weights are never saved in checkpoints, so a random backbone must be rebuilt bit-for-bit
identical in every process: everything here is derived from a seed with a private generator.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Words the tiny tokenizer learns as whole tokens: the task prompts, the synthetic demo's
# expressions and common English, so that the tiny LLM sees one token per word.
_CORPUS_WORDS = """
segment the according to text segmentation classify food in image from its recipe title classification
decide whether entails is neutral or contradicts hypothesis predict sentiment of following
red green blue yellow purple orange cyan magenta white black gray brown pink
circle square triangle diamond ring star cross shape object thing one that on left right top bottom
middle center big small large tiny a an and with of is are this it its at near next above below
man woman person people child dog cat car table chair bus plate food pizza cake apple pie soup
good bad great not very movie really like love hate think film was he she they i you we
""".split()
_CORPUS_LINES = [
    "Segment the {} according to the text. #Segmentation:",
    "Classify the food in the image from its recipe title: {}. #Classification:",
    "Decide whether the image entails, is neutral to, or contradicts the hypothesis: {}. #Classification:",
    "Predict the sentiment of the following text: {}. #Sentiment:",
]

TINY_LLM_PRESETS = ("tiny", "tiny-llama", "tiny-mistral", "tiny-qwen2")
# LLaMA shapes (hidden, FFN, layers, heads); key/value heads equal heads, as in LLaMA-2 7B/13B.
# The FFN of the 16x1024 shape follows LLaMA's rule (8/3 of the width, rounded up to 256).
LLAMA_SHAPE_PRESETS = {
    "random-llama-2-7b": (4096, 11008, 32, 32),
    "random-llama-2-13b": (5120, 13824, 40, 40),
    "random-llama-16x1024": (1024, 2816, 16, 16),
}
LLM_PRESETS = TINY_LLM_PRESETS + tuple(LLAMA_SHAPE_PRESETS)


def tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a built-in corpus: any text encodes, no download."""
    corpus = [line.format(word) for line in _CORPUS_LINES for word in _CORPUS_WORDS] + _CORPUS_WORDS
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def preset_llm_config(preset: str, vocab_size: int):
    """The HF config of a preset: a tiny decoder, or a LLaMA shape with the tiny vocabulary."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if preset in LLAMA_SHAPE_PRESETS:
        hidden, ffn, layers, heads = LLAMA_SHAPE_PRESETS[preset]
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    # a 4-layer, 64-wide decoder of the requested family, with grouped-query attention
    family = preset.removeprefix("tiny").removeprefix("-") or "llama"
    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return config_class(**common)


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """A fixed RNG state (CPU and GPU) for building a module, leaving the caller's RNG untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=64, patch_size=8, width=64, layers=4, head_width=16, mlp_ratio=2.0),
    text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1),
)
