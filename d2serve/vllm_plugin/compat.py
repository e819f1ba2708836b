"""Every vLLM name d2serve's vLLM plugin touches, with the vLLM releases each one was checked against.

The plugin (:mod:`d2serve.vllm_plugin.patches`) reaches vLLM only through this module:

* :data:`IMPORTS`: the vLLM classes and functions it uses, loaded by :func:`load`;
* :data:`PATCH_POINTS`: the methods and functions it wraps or re-implements, with the sha256 of each one's upstream source
  (``inspect.getsource``) and its signature in every checked release (:data:`CHECKED`);
* :data:`ATTRIBUTES_READ`: the attributes it reads or calls on vLLM objects;
* :data:`DORA_REFUSAL`: the one vLLM error text it matches; :data:`ENV_FLAGS`: the vLLM settings it reads.

:func:`problems` compares the installed vLLM against these records. :func:`d2serve.vllm_plugin.register`
installs the patches only when it finds none, so a vLLM release whose patched code changed (or that this
module has never seen) gets no patch at all: vLLM then runs as shipped and refuses d2serve's folded DoRA-style
folders itself (they carry ``use_dora: true``), which is safe, never a wrong answer.

Adding a release: install it in a separate venv, run ``scripts/check_vllm_compat.sh VENV`` (prints the
hashes, signatures and any missing name; runs the plugin's mocked-layer tests), read the upstream diff of every
method whose hash changed, then add its entry to :data:`CHECKED`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from dataclasses import dataclass
from types import SimpleNamespace

SUPPORTED_SERIES = ("0.32", "0.33")  # major.minor of the releases in CHECKED

#: name used by the plugin -> "module:qualname" in vLLM
IMPORTS = {
    "envs": "vllm.envs",
    "PEFTHelper": "vllm.lora.peft_helper:PEFTHelper",
    "LoRAModel": "vllm.lora.lora_model:LoRAModel",
    "parse_fine_tuned_lora_name": "vllm.lora.utils:parse_fine_tuned_lora_name",
    "LoRAModelManager": "vllm.lora.model_manager:LoRAModelManager",
    "BaseLinearLayerWithLoRA": "vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA",
    "MergedColumnParallelLinearWithLoRA": "vllm.lora.layers.column_parallel_linear:MergedColumnParallelLinearWithLoRA",
    "ReplicatedLinearWithLoRA": "vllm.lora.layers.replicated_linear:ReplicatedLinearWithLoRA",
    "UnquantizedLinearMethod": "vllm.model_executor.layers.linear:UnquantizedLinearMethod",
    "MergedColumnParallelLinear": "vllm.model_executor.layers.linear:MergedColumnParallelLinear",
    "maybe_get_oot_by_class": "vllm.model_executor.custom_op:maybe_get_oot_by_class",
    "lora_ops": "vllm.lora.ops.torch_ops.lora_ops",
    "torch_ops": "vllm.lora.ops.torch_ops",
    "punica_cpu": "vllm.lora.punica_wrapper.punica_cpu",
    "LoRAResolver": "vllm.lora.resolver:LoRAResolver",
    "LoRAResolverRegistry": "vllm.lora.resolver:LoRAResolverRegistry",
    "LoRARequest": "vllm.lora.request:LoRARequest",
    # prompt logprobs with LoRA on CPU (d2serve.vllm_plugin.logits)
    "GPUModelRunner": "vllm.v1.worker.gpu_model_runner:GPUModelRunner",
    "LogitsProcessorWithLoRA": "vllm.lora.layers.logits_processor:LogitsProcessorWithLoRA",
    "PunicaWrapperCPU": "vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU",
}


@dataclass(frozen=True)
class PatchPoint:
    """One vLLM method the plugin changes: ``owner`` (an :data:`IMPORTS` name), ``method``, and how.

    ``how`` is "wrapped" (the original runs, the plugin adds before/after it) or "re-implemented" (the plugin's
    function replaces the original; its body must be re-read against upstream whenever the hash changes).
    """

    owner: str
    method: str
    how: str

    @property
    def key(self) -> str:
        return f"{self.owner}.{self.method}"


PATCH_POINTS = (
    PatchPoint("PEFTHelper", "from_local_dir", "wrapped"),
    PatchPoint("PEFTHelper", "_validate_features", "wrapped"),
    PatchPoint("LoRAModel", "from_local_checkpoint", "wrapped"),
    PatchPoint("LoRAModelManager", "_create_lora_modules", "wrapped"),
    PatchPoint("LoRAModelManager", "_add_adapter", "wrapped"),
    PatchPoint("LoRAModelManager", "activate_adapter", "wrapped"),
    PatchPoint("BaseLinearLayerWithLoRA", "_apply_sync", "re-implemented"),
    PatchPoint("BaseLinearLayerWithLoRA", "_apply_base_forward", "re-implemented"),
    # one function, three bindings: the CPU punica wrapper calls the name it imported (0.32 indexes slot -1)
    PatchPoint("lora_ops", "bgmv_shrink", "wrapped"),
    PatchPoint("torch_ops", "bgmv_shrink", "wrapped"),
    PatchPoint("punica_cpu", "bgmv_shrink", "wrapped"),
    # d2serve.vllm_plugin.logits: one adapter slot per row for prompt logprobs on the CPU punica wrapper
    PatchPoint("GPUModelRunner", "_get_prompt_logprobs_dict", "wrapped"),
    PatchPoint("LogitsProcessorWithLoRA", "_get_logits", "wrapped"),
)

#: attributes the plugin reads or calls: IMPORTS name of the class -> names (instance or class attributes)
ATTRIBUTES_READ = {
    "BaseLinearLayerWithLoRA": ("base_layer", "output_slices", "n_slices", "tp_size", "slice_lora_b",
                                "punica_wrapper", "device", "_get_quant_method", "_apply_lora_to_output"),
    "LoRAModelManager": ("modules", "packed_modules", "lora_config", "lora_slots", "lora_index_to_id",
                         "_registered_adapters"),
    "LoRAModel": ("loras",),
    "LogitsProcessorWithLoRA": ("punica_wrapper", "lora_a_stacked", "lora_b_stacked"),
    "PunicaWrapperCPU": ("token_lora_indices", "sampler_indices", "_sampler_indices", "indices_len",
                         "add_lora_logits"),
}
#: attributes read on objects reached through the ones above (checked by the mocked-layer tests, not statically):
#: ``punica_wrapper.token_lora_indices`` (tokens,) int, -1 = no adapter; ``base_layer.quant_method``,
#: ``base_layer.bias``; ``lora_config.fully_sharded_loras``; ``LoRAModel.loras[name].lora_b`` (out, r)
INDIRECT_ATTRIBUTES = ("PunicaWrapperBase.token_lora_indices", "LinearBase.quant_method", "LinearBase.bias",
                       "LoRAConfig.fully_sharded_loras", "LoRALayerWeights.lora_b")

DORA_REFUSAL = "vLLM does not yet support DoRA."  # PEFTHelper._validate_features' text for use_dora
ENV_FLAGS = ("VLLM_LORA_ENABLE_DUAL_STREAM",)  # refused when set: its LoRA path is not patched

#: release -> PatchPoint.key -> (sha256 of inspect.getsource, first 16 hex digits; parameters, see _parameters)
CHECKED = {
    "0.32.0": {
        "PEFTHelper.from_local_dir": ("3d1a6d519746631b", "(cls, lora_path, max_position_embeddings)"),
        "PEFTHelper._validate_features": ("d66eb9c96f5e2b7d", "(self)"),
        "LoRAModel.from_local_checkpoint": ("d8dbecbe3d6f9c0e", "(cls, lora_dir, expected_lora_modules, peft_helper, *, "
                                            "lora_model_id=, device=, dtype=, model_vocab_size=, weights_mapper=, "
                                            "skip_prefixes=, moe_ep_spec=)"),
        "LoRAModelManager._create_lora_modules": ("d713c4fa88bc9b64", "(self)"),
        "LoRAModelManager._add_adapter": ("41669a3c69568621", "(self, lora)"),
        "LoRAModelManager.activate_adapter": ("0661f9e08a07fe15", "(self, lora_id)"),
        "BaseLinearLayerWithLoRA._apply_sync": ("0aa325824c187d76", "(self, x, bias=)"),
        "BaseLinearLayerWithLoRA._apply_base_forward": ("c01ffd2029da725d", "(self, x)"),
        **{f"{m}.bgmv_shrink": ("e7a5eafed74a2bc1", "(inputs, lora_b_weights, output_tensor, lora_indices_tensor, "
                                "scaling=)") for m in ("lora_ops", "torch_ops", "punica_cpu")},
        "GPUModelRunner._get_prompt_logprobs_dict": ("889fdb068dfc37dd", "(self, hidden_states, num_scheduled_tokens)"),
        "LogitsProcessorWithLoRA._get_logits": ("e78cb65460f61061", "(self, hidden_states, lm_head, embedding_bias=, "
                                                "skip_gather=)"),
    },
}
# 0.33.0 (the CUDA wheel, imported on a CPU machine; scripts/check_vllm_compat.sh): two methods changed, both
# re-read: _create_lora_modules only routes pooling/classifier heads differently (is_token_level,
# TokenClassificationHeadWithLoRA); activate_adapter now marks the adapter active and its slot taken after
# loading the weights instead of before. The plugin adds its scale buffers after the former and reads the slot
# after the latter has returned, so neither change reaches it. (0.33's CPU LoRA ops also mask slot -1, the
# 0.32 bug that d2serve's spare slot works around; the spare slot is kept, harmless.)
CHECKED["0.33.0"] = {
    **CHECKED["0.32.0"],
    "LoRAModelManager._create_lora_modules": ("b300f06d5777a3b2", "(self)"),
    "LoRAModelManager.activate_adapter": ("b044458b878ef5d4", "(self, lora_id)"),
    # 0.33 masks slot -1 inside bgmv_shrink itself; the wrapper's zeroing is then a no-op
    **{f"{m}.bgmv_shrink": ("ff08e86052b966c9", "(inputs, lora_b_weights, output_tensor, lora_indices_tensor, "
                            "scaling=)") for m in ("lora_ops", "torch_ops", "punica_cpu")},
}


def installed_version() -> str:
    """``vllm.__version__`` of the installed vLLM (imports it), "unknown" when it has none."""
    import vllm

    return getattr(vllm, "__version__", "unknown")


def series(version: str) -> str | None:
    """``"0.32"`` for ``"0.32.0"`` / ``"0.32.1.dev3+g..."`` when that series is supported, else None."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    s = f"{m.group(1)}.{m.group(2)}" if m else None
    return s if s in SUPPORTED_SERIES else None


def _resolve(target: str):
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


def load() -> SimpleNamespace:
    """The vLLM objects of :data:`IMPORTS`, imported now, as attributes of one namespace.

    Raises:
        ImportError / AttributeError: a name is missing from the installed vLLM (:func:`problems` says which).
    """
    return SimpleNamespace(**{name: _resolve(target) for name, target in IMPORTS.items()})


def _function(owner, method: str):
    f = inspect.getattr_static(owner, method)
    return getattr(f, "__func__", f)


def fingerprint(vllm_objects: SimpleNamespace | None = None) -> dict[str, tuple[str, str]]:
    """PatchPoint.key -> (sha256 of the method's upstream source, 16 hex digits; its parameters) as installed.

    Call before :func:`d2serve.vllm_plugin.patches.install` (afterwards the methods are the plugin's own).
    """
    ns = vllm_objects or load()
    out = {}
    for p in PATCH_POINTS:
        f = _function(getattr(ns, p.owner), p.method)
        out[p.key] = (hashlib.sha256(inspect.getsource(f).encode()).hexdigest()[:16], _parameters(f))
    return out


def _parameters(f) -> str:
    """The parameter list of ``f`` by name and kind, without annotations: ``"(self, x, bias=)"``."""
    parts, star = [], False
    for p in inspect.signature(f).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        star = star or p.kind is p.VAR_POSITIONAL
        parts.append(prefix + p.name + ("=" if p.default is not p.empty else ""))
    return f"({', '.join(parts)})"


def _has_attribute(cls, name: str) -> bool:
    if any(name in vars(c) for c in cls.__mro__):
        return True
    pattern = re.compile(rf"\bself\.{re.escape(name)}\s*(:[^=\n]+)?=[^=]")
    todo, seen = [cls], set()
    while todo:  # the class, its bases and its subclasses (layers set their widths in subclasses)
        c = todo.pop()
        if c in seen or c is object:
            continue
        seen.add(c)
        try:
            if pattern.search(inspect.getsource(c)):
                return True
        except (OSError, TypeError):
            pass
        todo += [*c.__bases__, *c.__subclasses__()]
    return False


def problems(version: str) -> list[str]:
    """Why the plugin must not patch the installed vLLM ``version`` (empty: safe to install).

    Checks, in order: the series is supported; every :data:`IMPORTS` name exists; every patched method's source
    hash equals a checked release's (:data:`CHECKED`); every :data:`ATTRIBUTES_READ` name exists on its class
    (as a class attribute or a ``self.NAME = ...`` assignment in the class, its bases or subclasses).
    """
    if series(version) is None:
        return [f"vLLM {version} is not a supported release (supported: "
                f"{', '.join(s + '.x' for s in SUPPORTED_SERIES)})"]
    try:
        ns = load()
    except (ImportError, AttributeError) as e:
        return [f"vLLM {version} lacks a name the plugin uses: {e}"]
    found = fingerprint(ns)
    out = []
    # a release matches only when it records every patch point (a point missing from its table is not "unchanged")
    known = [rel for rel, table in CHECKED.items() if set(table) == set(found)
             and all(found[k] == v for k, v in table.items())]
    if not known:
        changed = [k for k in found if all(table.get(k) != found[k] for table in CHECKED.values())]
        what = (f"the source of {', '.join(changed)} differs" if changed else
                "the patched methods' sources are a mix of releases, which matches none")
        out.append(f"vLLM {version}: {what} from every release the plugin was checked against ({', '.join(CHECKED)})")
    for owner, names in ATTRIBUTES_READ.items():
        cls = getattr(ns, owner)
        out += [f"vLLM {version}: {owner} has no attribute {n!r}" for n in names if not _has_attribute(cls, n)]
    return out
