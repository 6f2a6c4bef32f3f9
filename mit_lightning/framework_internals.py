"""The private framework names this project leans on, in one place, with the versions they were checked on.

None of them is promised by its library. `tests/test_framework_internals.py` looks each one up in the installed
versions, so an upgrade that removes one fails a test naming it, not a run deep inside a library."""

from __future__ import annotations

from dataclasses import dataclass

#: the library versions every entry below was read against
CHECKED_ON = {"torch": "2.14.1", "transformers": "5.24.0", "lightning": "2.6.6", "jsonargparse": "4.53.0"}


@dataclass(frozen=True)
class Internal:
    owner: str  # "module:qualified.name" of the class or object that has the attribute, or "module" itself
    attribute: str
    used_in: str
    why: str
    on_instance: bool = False  # an attribute set in __init__: looked up on `owner()`


INTERNALS = (
    Internal("transformers.masking_utils:ALL_MASK_ATTENTION_FUNCTIONS", "_global_mapping", "backbones/taps.py",
             "the mask function registered for a kernel, reused for its tapped twin (the registry has no getter)"),
    Internal("transformers:PretrainedConfig", "_attn_implementation", "backbones/taps.py",
             "the kernel a loaded model runs, so taps wrap that one"),
    Internal("lightning.pytorch.cli:LightningCLI", "_parse_ckpt_path", "cli.py",
             "overridden: Lightning would read class paths from a checkpoint's hyper_parameters"),
    Internal("lightning.pytorch.cli:LightningCLI", "_set_seed", "cli.py",
             "overridden by the parse-only CLI so parsing leaves the global RNG alone"),
    Internal("jsonargparse:ArgumentParser", "_actions", "cli.py",
             "whether a subcommand's parser has an option, before setting its default", on_instance=True),
    Internal("torch.nn:Module", "_forward_hooks", "inference.py",
             "counting hooks proves a fusion left a shared LLM as it found it", on_instance=True),
    Internal("torch.nn:Module", "_forward_pre_hooks", "inference.py",
             "as _forward_hooks", on_instance=True),
    Internal("torch", "_foreach_copy_", "master_weights.py",
             "every bf16 weight and its float32 copy in one kernel each way on a GPU (torch.optim's own tool)"),
)
