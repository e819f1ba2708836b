"""transformers as the runtime under test (``verify --engine hf``, the default): the merged safetensors checkpoint
loaded with transformers beside the unmerged reference; every section runs (weights, logits, generation, tasks)."""

from __future__ import annotations

from d2serve.runtimes.protocol import RuntimeUnderTest


class TransformersRuntime(RuntimeUnderTest):
    """The merged checkpoint in transformers, in verify's merged compute dtype, on its device."""

    name = "hf"
    description = "every check in transformers"

    def load_merged(self, merged, merged_ck, dtype, device):
        """``load_hf_model(merged_ck, dtype, device)`` (d2serve.models)."""
        from d2serve.models import load_hf_model

        return load_hf_model(merged_ck, dtype=dtype, device=device)

    def task_lm(self, model, reference, tokenizer, batch_size):
        """lm-eval's ``HFLM`` of ``model`` (d2serve.verify.tasks.hf_lm)."""
        from d2serve.verify.tasks import hf_lm

        return hf_lm(model, tokenizer, batch_size)
