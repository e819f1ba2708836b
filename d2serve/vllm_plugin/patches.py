"""The patch surface of d2serve's vLLM plugin (vLLM 0.32.x and 0.33.x): seven functions wrapped, two re-implemented.

Every vLLM name used here comes from :mod:`d2serve.vllm_plugin.compat` (imports, patched methods with the
sha256 of their upstream source per checked release, attributes read, the error text matched);
:func:`install` runs only after :func:`d2serve.vllm_plugin.compat.problems` found nothing.

=================================================  ==============================================================
vLLM function                                       what the wrapper adds
=================================================  ==============================================================
``PEFTHelper.from_local_dir``                       remembers the folder and the ``d2serve`` marker of its config
``PEFTHelper._validate_features``                   drops the DoRA refusal only for a folder with a valid marker
                                                    and its scales file (any other DoRA folder is still refused)
``LoRAModel.from_local_checkpoint``                 reads ``d2serve_scales.safetensors``: ``lora.d2_scales``
                                                    (vLLM module name -> s (out,) float32)
``LoRAModelManager._create_lora_modules``           gives every linear LoRA layer ``d2_scale_stacked``
                                                    (max_loras + 1, output width of this TP partition), float32,
                                                    all ones; the last row stays ones ("no adapter", index -1)
``LoRAModelManager._add_adapter``                   refuses, by name, what the scales cannot be applied to:
                                                    quantized base layers, fully sharded LoRA, MoE experts, packed
                                                    layers whose groups do not map 1:1 to slices, a base-forward
                                                    layer with a bias
``LoRAModelManager.activate_adapter``               copies the adapter's s into its slot row (sliced for TP like
                                                    lora_b; ones for modules it does not adapt)
``BaseLinearLayerWithLoRA._apply_sync`` /           **re-implemented** (the plugin's function replaces vLLM's):
``_apply_base_forward``                             base output without bias * d2_scale_stacked[token slot], then
                                                    bias, then vLLM's punica LoRA as before; the upstream bodies
                                                    are three lines each and have no hook between the base matmul
                                                    and the bias, so they are rewritten, and compat.CHECKED pins
                                                    their upstream source hash per release
``lora_ops.bgmv_shrink`` (CPU punica op, also       wrapped: zeroes the shrink output of tokens whose slot is -1 (no
bound as ``torch_ops.bgmv_shrink`` and              adapter): vLLM 0.32 indexes the stacked lora_a with -1, i.e. the
``punica_cpu.bgmv_shrink``)                         LAST slot, so base tokens batched with adapter tokens got the last
                                                    slot's LoRA whenever every slot was filled (the expand of a zero
                                                    buffer adds nothing, whatever slot it reads; 0.33 masks -1 itself)
``PEFTHelper.from_local_dir`` (same wrapper)        refuses an unfolded D2-LoRA folder and a PEFT DoRA folder
                                                    without the marker, naming ``d2serve export vllm-lora``
=================================================  ==============================================================

:func:`install` also installs :mod:`d2serve.vllm_plugin.logits` (prompt logprobs with LoRA on vLLM's CPU punica
path: ``GPUModelRunner._get_prompt_logprobs_dict`` and ``LogitsProcessorWithLoRA._get_logits``, both wrapped).

Row-parallel layers scale their partial sums before the all-reduce: s is per output row, so
sum_ranks(s * y_rank) = s * sum_ranks(y_rank); the bias is added on rank 0 only, after scaling.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from d2serve.vllm_plugin import compat, logits

SCALES_NAME = "d2serve_scales.safetensors"  # = d2serve.export.vllm_lora.SCALES_NAME (no d2serve import chain here)
MARKER = "d2serve"
SCALE_SUFFIX = "d2_scale"
FORMAT_VERSION = 1
_installed = False
_v = None  # compat.load() once install() runs: the vLLM classes and functions used below


def _marker_problem(helper) -> str | None:
    """None when ``helper`` (a PEFTHelper) carries a usable d2serve marker, else why not."""
    marker = getattr(helper, "d2serve_marker", None)
    folder = getattr(helper, "d2serve_dir", None)
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_VERSION:
        return f"adapter_config.json field {MARKER!r} must be a d2serve format {FORMAT_VERSION} marker, got {marker!r}"
    if folder is None or not os.path.isfile(os.path.join(folder, marker.get("scales", SCALES_NAME))):
        return f"{folder}: the d2serve row-scale file {marker.get('scales', SCALES_NAME)} is missing"
    return None


def _wrap_peft_helper() -> None:
    PEFTHelper = _v.PEFTHelper

    orig_from_local_dir = PEFTHelper.from_local_dir.__func__
    orig_validate = PEFTHelper._validate_features

    @classmethod
    @functools.wraps(orig_from_local_dir)
    def from_local_dir(cls, lora_path, max_position_embeddings):
        helper = orig_from_local_dir(cls, lora_path, max_position_embeddings)
        with open(os.path.join(lora_path, "adapter_config.json")) as f:
            config = json.load(f)
        _refuse_unfolded(lora_path, config)
        marker = config.get(MARKER)
        helper.d2serve_marker = marker
        helper.d2serve_dir = lora_path
        return helper

    @functools.wraps(orig_validate)
    def _validate_features(self):
        errors = orig_validate(self)
        if getattr(self, "d2serve_marker", None) is None:
            return errors
        problem = _marker_problem(self)
        if problem is not None:
            return [*errors, f"d2serve: {problem}."]
        return [e for e in errors if e != compat.DORA_REFUSAL]

    PEFTHelper.from_local_dir = from_local_dir
    PEFTHelper._validate_features = _validate_features


FOLD_HINT = "run `d2serve export vllm-lora --base BASE --adapter {path} --out FOLDER` and load FOLDER instead"


def _refuse_unfolded(lora_path: str, config: dict) -> None:
    """Raise ValueError for an adapter folder that must be folded (d2serve.export.vllm_lora) before vLLM serves it.

    An unfolded D2-LoRA folder (``peft_type: D2LORA``) has no lora_A/lora_B pair vLLM can read, and a PEFT DoRA folder
    without the ``d2serve`` marker has no row scales: vLLM would refuse the first obscurely (or serve nothing of it) and
    refuses the second ("vLLM does not yet support DoRA") without saying what to do. The message names the fix.
    """
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "D2LORA":
        kind = "an unfolded D2-LoRA adapter"
    elif config.get("use_dora") and config.get(MARKER) is None:
        kind = "an unfolded PEFT DoRA adapter (no d2serve row scales)"
    else:
        return
    raise ValueError(f"d2serve: {lora_path} is {kind}; vLLM serves D2-LoRA / DoRA only as a folded LoRA folder with "
                     f"row scales: {FOLD_HINT.format(path=lora_path)}")


def _wrap_lora_model() -> None:
    from safetensors.torch import load_file

    LoRAModel, parse_fine_tuned_lora_name = _v.LoRAModel, _v.parse_fine_tuned_lora_name

    orig = LoRAModel.from_local_checkpoint.__func__

    @classmethod
    @functools.wraps(orig)
    def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, **kwargs):
        lora = orig(cls, lora_dir, expected_lora_modules, peft_helper, **kwargs)
        marker = getattr(peft_helper, "d2serve_marker", None)
        if marker is None:
            return lora
        problem = _marker_problem(peft_helper)
        if problem is not None:
            raise ValueError(f"d2serve: {problem}")
        path = os.path.join(lora_dir, marker.get("scales", SCALES_NAME))
        scales = {}
        for key, t in load_file(path).items():
            if not key.endswith("." + SCALE_SUFFIX) or t.dim() != 1 or not torch.isfinite(t).all():
                raise ValueError(f"d2serve: {path}: tensor {key!r} is not a finite 1-D <module>.{SCALE_SUFFIX}")
            if ".experts." in key:
                raise ValueError(f"d2serve: {path}: {key}: MoE expert layers are not supported by d2serve's plugin")
            stem = key[: -len(SCALE_SUFFIX) - 1]
            name, _ = parse_fine_tuned_lora_name(stem + ".lora_A.weight", kwargs.get("weights_mapper"))
            scales[name] = t.to(torch.float32)
        missing = sorted(set(lora.loras) - set(scales))
        extra = sorted(set(scales) - set(lora.loras))
        if missing or extra:
            raise ValueError(f"d2serve: {path}: scales do not match the LoRA modules of {lora_dir}: "
                             f"missing {missing[:3]}, extra {extra[:3]}")
        for name, s in scales.items():
            b = lora.loras[name].lora_b
            if b is not None and b.shape[0] != s.shape[0]:
                raise ValueError(f"d2serve: {path}: {name} has {s.shape[0]} scales for {b.shape[0]} output rows")
        lora.d2_scales = scales
        return lora

    LoRAModel.from_local_checkpoint = from_local_checkpoint


def _linear_layers(manager):
    return {n: m for n, m in manager.modules.items() if isinstance(m, _v.BaseLinearLayerWithLoRA)}


def _layer_problems(manager, lora) -> list[str]:
    """Why ``lora``'s scales cannot be applied by some layer of ``manager`` (empty when they can)."""
    scales = lora.d2_scales
    problems = []
    if manager.lora_config.fully_sharded_loras:
        problems.append("fully sharded LoRA (--fully-sharded-loras) is not supported")
    used = set()
    for name, module in _linear_layers(manager).items():
        subs = manager.packed_modules.get(name, [name])
        hits = [n for n in subs if n in scales]
        if not hits:
            continue
        used.update(hits)
        if all(bool((scales[n] == 1).all()) for n in hits):
            continue  # s = 1 on every row here: nothing to apply
        if type(module.base_layer.quant_method) is not _v.UnquantizedLinearMethod:
            problems.append(f"{name}: quantized base layer ({type(module.base_layer.quant_method).__name__}); "
                            "s was computed from full-precision weights")
        if len(subs) > 1 and len(subs) != module.n_slices:
            problems.append(f"{name}: {len(subs)} packed groups for {module.n_slices} slices")
        if _uses_base_forward(module) and getattr(module.base_layer, "bias", None) is not None:
            problems.append(f"{name}: {type(module).__name__} runs the base layer's own forward with its bias")
    for n, s in scales.items():
        if n not in used and bool((s != 1).any()):
            problems.append(f"{n}: no linear LoRA layer of this model serves it (MoE experts, embeddings, heads?)")
    return problems


def _uses_base_forward(module) -> bool:
    """Whether ``module.apply`` goes through ``_apply_base_forward`` (replicated / custom merged layers)."""
    if isinstance(module, _v.ReplicatedLinearWithLoRA):
        return True
    if isinstance(module, _v.MergedColumnParallelLinearWithLoRA) and module.tp_size == 1:
        cls = _v.maybe_get_oot_by_class(_v.MergedColumnParallelLinear)
        fwd = getattr(type(module.base_layer), "forward", None)
        return type(module.base_layer) is not cls and fwd is not None and fwd is not getattr(cls, "forward", None)
    return False


def _slot_row(manager, name: str, module, scales: dict) -> torch.Tensor | None:
    """The s of this TP partition's output rows for module ``name`` (None: every row is 1)."""
    subs = manager.packed_modules.get(name)
    if subs is None:
        s = scales.get(name)
        if s is None:
            return None
        col = s.unsqueeze(1)
        return (module.slice_lora_b(col) if module.tp_size > 1 else col)[:, 0]
    parts = [scales[n].unsqueeze(1) if n in scales else None for n in subs]
    if all(p is None for p in parts):
        return None
    if module.tp_size > 1:
        parts = module.slice_lora_b(parts)
    return torch.cat([p[:, 0] if p is not None else torch.ones(size) for p, size in zip(parts, module.output_slices)])


def _wrap_manager() -> None:
    LoRAModelManager = _v.LoRAModelManager

    orig_create = LoRAModelManager._create_lora_modules
    orig_add = LoRAModelManager._add_adapter
    orig_activate = LoRAModelManager.activate_adapter

    @functools.wraps(orig_create)
    def _create_lora_modules(self):
        orig_create(self)
        for module in _linear_layers(self).values():
            width = sum(module.output_slices)
            module.d2_scale_stacked = torch.ones(self.lora_slots + 1, width, dtype=torch.float32, device=module.device)

    @functools.wraps(orig_add)
    def _add_adapter(self, lora):
        if getattr(lora, "d2_scales", None) is not None:
            problems = _layer_problems(self, lora)
            if problems:
                raise ValueError("d2serve: this adapter's row scales cannot be served here:\n  - "
                                 + "\n  - ".join(problems[:10]))
        return orig_add(self, lora)

    @functools.wraps(orig_activate)
    def activate_adapter(self, lora_id):
        activated = orig_activate(self, lora_id)
        if activated:
            index = self.lora_index_to_id.index(lora_id)
            scales = getattr(self._registered_adapters[lora_id], "d2_scales", None) or {}
            for name, module in _linear_layers(self).items():
                row = _slot_row(self, name, module, scales)
                buf = module.d2_scale_stacked
                if row is None:
                    buf[index].fill_(1.0)
                else:
                    if row.shape[0] != buf.shape[1]:
                        raise ValueError(f"d2serve: {name}: {row.shape[0]} scales for {buf.shape[1]} output rows")
                    buf[index].copy_(row)
        return activated

    LoRAModelManager._create_lora_modules = _create_lora_modules
    LoRAModelManager._add_adapter = _add_adapter
    LoRAModelManager.activate_adapter = activate_adapter


def _scale_rows(layer, output: torch.Tensor) -> torch.Tensor:
    """output (tokens, width) [or (1, tokens, width)] * d2_scale_stacked[token slot], computed in float32."""
    buf = getattr(layer, "d2_scale_stacked", None)
    if buf is None:
        return output
    idx = layer.punica_wrapper.token_lora_indices  # (tokens,), -1 = no adapter -> the last (all-ones) row
    flat = output.reshape(-1, output.shape[-1])
    if idx.shape[0] < flat.shape[0]:  # padded batch rows (graph capture sizes): no adapter
        idx = torch.cat([idx, idx.new_full((flat.shape[0] - idx.shape[0],), -1)])
    s = buf[idx[: flat.shape[0]]]
    return (flat.float() * s).to(output.dtype).reshape(output.shape)


def _wrap_linear() -> None:
    BaseLinearLayerWithLoRA = _v.BaseLinearLayerWithLoRA

    orig_base_forward = BaseLinearLayerWithLoRA._apply_base_forward

    def _apply_sync(self, x, bias=None):
        """Re-implements vLLM's BaseLinearLayerWithLoRA._apply_sync: base matmul without bias, x d2 row scale of
        the token's slot (float32), + bias, + vLLM's LoRA. x (tokens, in) -> (tokens, out_partition)."""
        output = self._get_quant_method().apply(self.base_layer, x, None)
        output = _scale_rows(self, output)
        if bias is not None:
            output = output + bias
        return self._apply_lora_to_output(x, output)

    def _apply_base_forward(self, x):
        """Re-implements vLLM's BaseLinearLayerWithLoRA._apply_base_forward: the base layer's own forward, x the
        d2 row scale of the token's slot, + vLLM's LoRA."""
        # only layers without a bias reach here with s != 1 (_layer_problems refuses the others)
        base_output = self.base_layer(x)
        output = base_output[0] if isinstance(base_output, tuple) else base_output
        return self._apply_lora_to_output(x, _scale_rows(self, output))

    for new, old in ((_apply_sync, BaseLinearLayerWithLoRA._apply_sync), (_apply_base_forward, orig_base_forward)):
        doc = new.__doc__
        functools.update_wrapper(new, old)
        new.__doc__ = doc  # the re-implementation says so (and keeps __wrapped__ pointing at vLLM's)
    BaseLinearLayerWithLoRA._apply_sync = _apply_sync
    BaseLinearLayerWithLoRA._apply_base_forward = _apply_base_forward


def _wrap_cpu_lora_shrink() -> None:
    """Make vLLM 0.32's CPU LoRA ops give tokens without an adapter (slot -1) no LoRA, whatever the slots hold.

    ``bgmv_shrink`` (vllm/lora/ops/torch_ops/lora_ops.py) gathers ``lora_a_stacked[token slot]``; slot -1 is
    Python's LAST slot, so with every slot filled a base token batched with adapter tokens got the last adapter's
    x A^T, and the matching ``bgmv_expand*`` then added its B (vLLM's GPU kernels skip -1). The wrapper zeroes the
    shrink output rows of slot -1 tokens; every CPU LoRA product is shrink-then-expand (``add_lora_linear``,
    ``add_lora_logits``; ``sgmv_shrink`` calls ``bgmv_shrink`` through the module), and the expand of a zero row
    adds exactly 0. ``apply_lora_full_linear`` masks slot -1 itself (``_select_full_linear_output``).
    """
    lora_ops, torch_ops, punica_cpu = _v.lora_ops, _v.torch_ops, _v.punica_cpu
    orig = lora_ops.bgmv_shrink

    @functools.wraps(orig)
    def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        orig(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
        # (tokens, 1) mask; one index broadcasts over every row exactly as the gather did
        output_tensor.masked_fill_((lora_indices_tensor < 0).reshape(-1, 1), 0.0)

    lora_ops.bgmv_shrink = torch_ops.bgmv_shrink = punica_cpu.bgmv_shrink = bgmv_shrink  # every binding CPU code calls


def install() -> None:
    """Apply every wrapper once (idempotent); refuses the CUDA dual-stream LoRA path, which it does not patch.

    Call only when :func:`d2serve.vllm_plugin.compat.problems` is empty (``register`` does).

    Raises:
        RuntimeError: VLLM_LORA_ENABLE_DUAL_STREAM is set.
    """
    global _installed, _v
    if _installed:
        return
    _v = compat.load()
    if _v.envs.VLLM_LORA_ENABLE_DUAL_STREAM:
        raise RuntimeError("d2serve's vLLM plugin does not patch VLLM_LORA_ENABLE_DUAL_STREAM's LoRA path; unset it")
    _wrap_peft_helper()
    _wrap_lora_model()
    _wrap_manager()
    _wrap_linear()
    _wrap_cpu_lora_shrink()
    logits.install(_v)  # prompt logprobs with LoRA on CPU: d2serve.vllm_plugin.logits (two wrapped methods)
    _installed = True
