"""An ORT-GenAI export folder as the model under test: teacher-forced logits, greedy steps, lm-eval log-likelihoods.

One job: make the artifact that is actually deployed (an ONNX Runtime GenAI folder written by
``d2serve export onnx --target genai``, any precision) answer the questions verify and the
quantization gate ask a transformers model:

* :meth:`OrtGenaiModel.logits` -- logits at every position of a token sequence (teacher-forced);
* ``OrtGenaiModel(input_ids=..., past_key_values=..., use_cache=True)`` -- the transformers call
  convention used by :func:`d2serve.verify.logits.compare_logits` and
  :func:`d2serve.verify.generation.greedy_tokens` (the "past" is the live ``og.Generator``);
* :class:`OrtGenaiLM` -- an lm-eval ``TemplateLM`` whose ``loglikelihood`` is computed from ORT-GenAI
  logits, with requests tokenized by a reference lm-eval ``HFLM`` (``like``), so both models score
  exactly the same token ids, as lm-eval does (sum of log-probs of the continuation tokens given the
  context; ``is_greedy`` = every continuation token is the argmax).

Everything runs on the CPU execution provider; all log-probabilities are computed in float64.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from d2serve.errors import InputError
from d2serve.export.manifest import EXPORT_MANIFEST
from d2serve.runtimes.protocol import RuntimeUnderTest

GENAI_CONFIG = "genai_config.json"


def is_onnx_export(folder: str | Path) -> bool:
    """Whether ``folder`` is an ORT-GenAI export (holds ``genai_config.json``; d2serve exports also hold
    ``d2serve_export.json``) rather than a safetensors checkpoint."""
    p = Path(folder)
    return p.is_dir() and (p / GENAI_CONFIG).is_file()


def export_manifest(folder: str | Path) -> dict | None:
    """The folder's ``d2serve_export.json`` as a dict, or None when it has none.

    Raises:
        InputError: the manifest exists but is not JSON.
    """
    p = Path(folder) / EXPORT_MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: export manifest is not JSON: {e}") from e


class OrtGenaiModel:
    """An ORT-GenAI decoder folder behind a transformers-like interface (batch 1, CPU).

    Args:
        folder: export folder (``genai_config.json`` + decoder ``.onnx`` + external data).
        max_length: KV-cache length allocated per generator (prompt + new tokens must fit).

    Raises:
        OnnxExportError: the folder is incomplete (missing config, decoder or external data; named).
    """

    def __init__(self, folder: str | Path, max_length: int = 1024):
        from d2serve.export.onnx_genai import open_genai_model

        self.folder = Path(folder)
        self.model = open_genai_model(self.folder)
        self.max_length = int(max_length)
        self.all_position_logits: bool | None = None  # learnt on first use: does the logits output cover every position?

    def _generator(self, length: int | None = None):
        """A fresh generator whose KV cache holds ``length`` tokens (None -> ``max_length``, for continuing)."""
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=int(length or self.max_length), do_sample=False)
        return og.Generator(self.model, params)

    def _append(self, gen, ids: list[int]) -> np.ndarray:
        """Append ``ids`` to ``gen``; float32 logits ``(len(ids), vocab)`` for every appended position."""
        gen.append_tokens(np.asarray([ids], dtype=np.int32))
        if len(ids) == 1:
            return np.asarray(gen.get_logits(), dtype=np.float32).reshape(1, -1)
        if self.all_position_logits is not False:
            out = np.asarray(gen.get_output("logits"), dtype=np.float32)
            if out.ndim == 3 and out.shape[1] == len(ids):
                self.all_position_logits = True
                return out[0]
            self.all_position_logits = False
        raise _NeedsStepping()

    def logits(self, ids: list[int] | torch.Tensor) -> np.ndarray:
        """Teacher-forced logits of ``ids`` (1-D ints): float32 ``(len(ids), vocab)``, row i predicts token i+1.

        Uses the decoder's full logits output of one forward when it covers every position;
        otherwise feeds the tokens one at a time through the KV cache (same numbers, slower).
        """
        ids = [int(t) for t in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        gen = self._generator(len(ids) + 1)
        try:
            return self._append(gen, ids)
        except _NeedsStepping:
            gen = self._generator(len(ids) + 1)
            return np.stack([self._append(gen, [t])[0] for t in ids])

    def __call__(self, input_ids: torch.Tensor, past_key_values=None, use_cache: bool = True, **_):
        """transformers-style call for batch 1: ``input_ids`` int64 (1, T) -> ``.logits`` float32 (1, T, vocab),
        ``.past_key_values`` the live generator (pass it back to continue the sequence)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise InputError(f"OrtGenaiModel: expected input_ids of shape (1, T), got {tuple(input_ids.shape)}")
        ids = [int(t) for t in input_ids[0].tolist()]
        if past_key_values is None:
            if len(ids) >= self.max_length:
                raise InputError(f"{self.folder}: {len(ids)} tokens do not fit max_length {self.max_length}")
            gen = self._generator()
            try:
                rows = self._append(gen, ids)
            except _NeedsStepping:
                gen = self._generator()
                rows = np.stack([self._append(gen, [t])[0] for t in ids])
        else:
            gen = past_key_values
            rows = np.stack([self._append(gen, [t])[0] for t in ids])
        return SimpleNamespace(logits=torch.from_numpy(rows).unsqueeze(0), past_key_values=gen)

    def eval(self):
        """No-op (API parity with torch modules)."""
        return self


class _NeedsStepping(Exception):
    """The logits output holds only the last position: feed tokens one by one."""


@functools.cache
def _lm_class():
    """The ``TemplateLM`` subclass (built on first use: importing lm-eval takes seconds)."""
    from lm_eval.api.model import TemplateLM

    class _OrtGenaiLM(TemplateLM):
        def __init__(self, model: OrtGenaiModel, like):
            super().__init__()
            self.onnx = model
            self.like = like
            self.tokenizer = like.tokenizer

        @property
        def eot_token_id(self) -> int:
            return self.like.eot_token_id

        @property
        def prefix_token_id(self):
            return self.like.prefix_token_id

        @property
        def max_length(self) -> int:
            return self.like.max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.like.tok_encode(string, add_special_tokens=add_special_tokens, **kwargs)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            out = []
            for req, ctx, cont in requests:
                whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
                inp = whole[:-1]
                rows = torch.from_numpy(self.onnx.logits(inp)[-len(cont):]).double()
                lp = torch.log_softmax(rows, -1)
                tgt = torch.tensor(cont, dtype=torch.long)
                ll = float(lp.gather(1, tgt.unsqueeze(1)).sum())
                greedy = bool((lp.argmax(-1) == tgt).all())
                out.append((ll, greedy))
                self.cache_hook.add_partial("loglikelihood", req, (ll, greedy))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("OrtGenaiLM scores multiple-choice tasks only (no rolling log-likelihood)")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("OrtGenaiLM scores multiple-choice tasks only (no generation tasks)")

    return _OrtGenaiLM


def OrtGenaiLM(model: OrtGenaiModel, like):  # noqa: N802 - reads as the class it builds
    """lm-eval ``TemplateLM`` scoring multiple-choice requests with an ORT-GenAI model.

    Tokenization (``tok_encode``, ``prefix_token_id``, ``eot_token_id``, ``max_length``) is borrowed
    from ``like``, the lm-eval ``HFLM`` of the reference model, so the ONNX model scores the very
    token ids the reference scores. Per request: input = (context + continuation)[-(max_length+1):][:-1]
    (lm-eval's causal rule), one teacher-forced pass, log-probs (float64 log_softmax) of the
    continuation tokens summed.

    Args:
        model: :class:`OrtGenaiModel`.
        like: the reference lm-eval ``HFLM`` (its tokenizer settings are used).

    Raises (per call):
        NotImplementedError: ``loglikelihood_rolling`` / ``generate_until`` (only multiple-choice tasks).
    """
    return _lm_class()(model, like)


def onnx_label(folder: str | Path) -> str:
    """A short description of an export folder for reports, e.g. ``onnx genai int4 (recipe int4-acc1, gate passed)``."""
    man = export_manifest(folder) or {}
    q = man.get("quant") or {}
    parts = [f"onnx {man.get('target', 'genai')} {man.get('precision', '?')}"]
    if q:
        parts.append(f"(recipe {q.get('recipe')}, gate {'passed' if man.get('passed') else 'FAILED'})")
    elif man:
        parts.append(f"(export checks {'passed' if man.get('passed') else 'FAILED'})")
    else:
        parts.append(f"(no {EXPORT_MANIFEST})")
    return " ".join(parts)



class OrtGenaiRuntime(RuntimeUnderTest):
    """An ORT-GenAI export folder (``d2serve export onnx --target genai``, any precision) as the merged model under
    test: logits, generation and tasks through ONNX Runtime GenAI (CPU); no weight check (its weights may be
    quantized and are not safetensors)."""

    name = "ort-genai"
    description = "an ONNX Runtime GenAI export folder as --merged (chosen by its genai_config.json)"
    artifact = "ONNX Runtime GenAI export"
    engine_option = False
    opens_merged_checkpoint = False
    checks_weights = False
    weights_skipped = ("skipped: the model under test is an ONNX export (its weights may be quantized and are not "
                       "safetensors); logits, generation and tasks run through ONNX Runtime GenAI")

    @classmethod
    def detects(cls, merged) -> bool:
        """A folder with ``genai_config.json`` (:func:`is_onnx_export`)."""
        return is_onnx_export(merged)

    def merged_dtype_label(self, merged, merged_ck) -> str:
        """:func:`onnx_label`, e.g. ``onnx genai int4 (recipe int4-acc1, gate passed)``."""
        return onnx_label(merged)

    def compute_label(self, compute_dtype) -> str:
        """ORT-GenAI computes in the export's own precision, on the CPU."""
        return "onnxruntime-genai (CPU)"

    def load_merged(self, merged, merged_ck, dtype, device):
        """:class:`OrtGenaiModel` of the folder (CPU execution provider)."""
        return OrtGenaiModel(merged)

    def task_lm(self, model, reference, tokenizer, batch_size):
        """:func:`OrtGenaiLM`, tokenizing like the reference's lm-eval ``HFLM``."""
        from d2serve.verify.tasks import hf_lm

        return OrtGenaiLM(model, like=hf_lm(reference, tokenizer, batch_size))
