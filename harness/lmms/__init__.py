"""The lmms-eval backend: the ``lazyattn`` lmms-eval model, the shapes tasks, in-process evaluation.

Needs the optional lmms-eval install (``make lmms-install``, docs/benchmarks.md, "The lmms-eval backend"); nothing
here is imported by the harness unless a task's backend is ``lmms_eval``.
"""


def manifest():
    """Entry point (group ``lmms_eval.models``): registers ``--model lazyattn`` with lmms-eval."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="lazyattn", chat_class_path="harness.lmms.model.LazyAttnLMM")
