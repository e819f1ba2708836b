"""The benchmark arms: which model each arm runs and how it is loaded.

Arms (``adapter_mode`` is the only setting allowed to differ between them):

* ``base``: the base checkpoint, no adapter (``adapter_mode="none"``).
* ``merged``: the merged checkpoint written by ``d2serve merge`` (``"merged"``).
* ``unmerged``: base + D2-LoRA layers applied on the fly as in training (``"unmerged"``).
* ``unmerged_cached``: as ``unmerged`` with the scale m/||W0+dW|| computed once and cached,
  the best an unmerged deployment can do (``"unmerged_cached_scale"``).
* ``vanilla_lora`` (vLLM backend, only when asked for): the plugin-cost control. The ``unmerged`` arm's
  folded rank-R LoRA (the same ``lora_A`` (R, in) / ``lora_B`` (out, R) tensors on the same modules) as a
  plain PEFT LoRA without the row scales, served by vanilla vLLM LoRA with no plugin loaded
  (``VLLM_PLUGINS=""``; ``"lora_vanilla_vllm"``). ``unmerged`` time / ``vanilla_lora`` time is what d2serve's
  plugin costs; its answers are not the adapter's (no scales), so only its timings are compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from d2serve.errors import InputError

ARM_NAMES = ("base", "merged", "unmerged", "unmerged_cached", "vanilla_lora")
ADAPTER_MODES = {
    "base": "none",
    "merged": "merged",
    "unmerged": "unmerged",
    "unmerged_cached": "unmerged_cached_scale",
    "vanilla_lora": "lora_vanilla_vllm",
}
# arms run only when named in ``arms`` (never part of the default set)
OPT_IN_ARMS = frozenset({"vanilla_lora"})


class ArmError(InputError):
    """An arm cannot be built from the given directories (missing input or loader)."""


@dataclass(frozen=True)
class ArmSpec:
    """What one arm runs.

    Attributes:
        name: one of ``ARM_NAMES``.
        model_dir: the HF checkpoint loaded (base dir for base/unmerged arms, merged dir for merged).
        adapter_dir: the adapter applied on the fly (unmerged arms only), else None.
    """

    name: str
    model_dir: Path
    adapter_dir: Path | None = None

    @property
    def adapter_mode(self) -> str:
        """The arm's adapter mode, the one setting allowed to differ between arms."""
        return ADAPTER_MODES[self.name]


def plan_arms(
    *, base: Path, adapter: Path | None, merged: Path | None,
    arms: tuple[str, ...] = tuple(a for a in ARM_NAMES if a not in OPT_IN_ARMS),
) -> list[ArmSpec]:
    """Build the arm specs requested in ``arms`` from the input directories.

    Raises:
        ArmError: an unknown arm name, or an arm whose input directory was not given or does not exist.
    """
    specs = []
    for name in arms:
        if name not in ADAPTER_MODES:
            raise ArmError(f"unknown arm {name!r}; expected one of {', '.join(ARM_NAMES)}")
        if name == "base":
            spec = ArmSpec(name, Path(base))
        elif name == "merged":
            if merged is None:
                raise ArmError("arm 'merged' needs a merged checkpoint (merged, the output of `d2serve merge`)")
            spec = ArmSpec(name, Path(merged))
        else:
            if adapter is None:
                raise ArmError(f"arm {name!r} needs an adapter (adapter)")
            spec = ArmSpec(name, Path(base), Path(adapter))
        for d in (spec.model_dir, spec.adapter_dir):
            if d is not None and not d.is_dir():
                raise ArmError(f"arm {name!r}: directory {d} does not exist")
        specs.append(spec)
    return specs


def load_arm_model(spec: ArmSpec, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """Load the model an arm runs, in eval mode on ``device``.

    Uses ``d2serve.models.load_hf_model`` (base, merged) and
    ``d2serve.models.load_unmerged_model(..., cache_scale=...)`` (unmerged arms).

    Raises:
        CheckpointError / AdapterError: the arm's directories cannot be loaded (named).
    """
    from d2serve import models

    if spec.adapter_dir is None:
        model = models.load_hf_model(spec.model_dir, dtype=dtype)
    else:
        model = models.load_unmerged_model(
            spec.model_dir, spec.adapter_dir, dtype=dtype, cache_scale=(spec.name == "unmerged_cached")
        )
    return model.to(device).eval()
