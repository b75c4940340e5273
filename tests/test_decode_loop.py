"""The decode loop a GPU can trust: a decode step reads nothing from the device and builds no tensor
from Python data, for dense and every method; answering asks the device whether every row has
ended at most once every ``CHECK_EVERY`` steps; and M-RoPE models (Qwen2-VL, Qwen2.5-VL) answer
through the same loop and cache, token for token as ``model.generate``.

The audit counts, with a ``TorchDispatchMode``, every operator that reads a tensor's value on the
host (``_local_scalar_dense``, ``item``, ``is_nonzero``, ``equal``), whose output shape depends on
the data (``nonzero``, ``masked_select``, indexing with a boolean mask) or that lifts Python data
into a tensor (``lift_fresh``). On CUDA each is a synchronisation (or a host-to-device copy) in
the middle of a step. A step without any adds none: a 20-step decode counts what a 4-step one does
(prefill may read what it needs)."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lazyattn
from harness import measure
from harness.generate import CHECK_EVERY, Generator, conversation, prompt_inputs
from harness.models import families
from harness.tasks import shapes

HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "lift_fresh",
              "lift_fresh_copy"}
SPECS = {
    "dense": {"name": "dense"},
    "lazy qk": {"name": "lazy", "layers": [1, 3]},
    "lazy qkv": {"name": "lazy", "layers": [1, 3], "share": "qkv"},
    "lazy VLA": {"name": "lazy", "layers": [1, 3], "scope": "visual"},
    "lazy visual_scores": {"name": "lazy", "layers": [1, 3], "scope": "visual_scores"},
    "fastv": {"name": "fastv", "k": 1, "ratio": 0.5},
    "sparsevlm": {"name": "sparsevlm", "budget": 64},
    "vtw": {"name": "vtw", "k": 2},
    "prumerge_plus": {"name": "prumerge_plus"},
    "lazy_fastv": {"name": "lazy_fastv", "lazy": {"layers": [3]}, "fastv": {"k": 1, "ratio": 0.5}},
}


class HostReads(TorchDispatchMode):
    """Counts the operators that read the device on the host or lift host data (by name)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.counts[name] += 1
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in args[1] if t is not None):
            self.counts[f"{name}[bool]"] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def models():
    return {name: families.build_random(*families.TINY_SHAPES[name], initializer_range=0.2)
            for name in ("llava_llama", "qwen2_vl", "qwen2_5_vl")}


def _inputs(loaded, padded: bool):
    size = 64 if loaded.model.config.model_type.startswith("qwen") else 32
    samples = shapes.load_split("test", 2)
    questions = [samples[0].questions[0], samples[1].questions[0] + (" a red circle" if padded else "")]
    return prompt_inputs(loaded.processor, [conversation([q], []) for q in questions],
                         [s.image(size) for s in samples], "cpu", loaded.model.dtype)


def _timed_reads(model, inputs, method, new_tokens: int) -> dict:
    with method.apply(model), torch.inference_mode(), HostReads() as audit:
        measure.generate_once(model, inputs, new_tokens)
    return dict(audit.counts)


@pytest.mark.parametrize("name", list(SPECS))
def test_a_timed_decode_step_reads_nothing_on_the_host(models, name):
    loaded = models["llava_llama"]
    inputs = _inputs(loaded, padded=False)
    method = lazyattn.build(SPECS[name])
    short, long = _timed_reads(loaded.model, inputs, method, 4), _timed_reads(loaded.model, inputs, method, 20)
    assert long == short, (name, short, long)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_an_m_rope_decode_step_reads_nothing_on_the_host(models, family):
    loaded = models[family]
    inputs = _inputs(loaded, padded=False)
    for name in ("dense", "lazy qk", "lazy VLA", "fastv"):
        method = lazyattn.build(SPECS[name])
        short, long = _timed_reads(loaded.model, inputs, method, 4), _timed_reads(loaded.model, inputs, method, 20)
        assert long == short, (family, name, short, long)


def test_answering_checks_for_ended_rows_once_every_check_every_steps(models):
    """A padded batch with its own budget per row and the stop token allowed from the first step:
    the mask goes to the model every step, and the device is asked only every CHECK_EVERY steps."""
    loaded = models["llava_llama"]
    inputs = _inputs(loaded, padded=True)
    model = loaded.model
    model.generation_config.eos_token_id = None  # no stop token: every row runs to its budget ...
    gen = Generator(model, loaded.processor, "cpu")
    model.generation_config.eos_token_id = loaded.processor.tokenizer.eos_token_id
    gen.eos = 10**6  # ... through the stop-token path (an id the model never emits)
    reads = {}
    for budgets in ([8, 5], [8 + 4 * CHECK_EVERY, 5]):
        with torch.inference_mode(), HostReads() as audit:
            dialogue, answers = gen.answer_inputs(inputs, budgets)
        assert [len(a) for a in answers] == budgets and dialogue.holes
        reads[budgets[0]] = sum(audit.counts.values())
    assert reads[8 + 4 * CHECK_EVERY] - reads[8] == 4, reads  # one read for each CHECK_EVERY further steps


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("name", ["dense", "lazy qk", "lazy VLA"])
def test_m_rope_models_answer_through_the_loop_as_generate_does(models, family, name):
    """Qwen2-VL and Qwen2.5-VL answer through the harness's loop and preallocated cache (their prompt's
    M-RoPE positions from the model's get_rope_index, as generate computes them), token for token as
    model.generate, on a left-padded batch with a budget per row."""
    loaded = models[family]
    inputs = _inputs(loaded, padded=True)
    assert not bool(inputs["attention_mask"].all())  # really padded
    model, method, budgets = loaded.model, lazyattn.build(SPECS[name]), [7, 4]
    image = model.config.image_token_id
    with method.apply(model), torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max(budgets), do_sample=False, suppress_tokens=[image])
        gen = Generator(model, loaded.processor, "cpu")
        _, answers = gen.answer_inputs(inputs, budgets)
    eos = gen.eos
    for row, budget, answer in zip(out[:, inputs["input_ids"].shape[1]:].tolist(), budgets, answers):
        row = row[:budget]
        expected = row[: row.index(eos) + 1] if eos in row else row
        assert answer == expected, (family, name)


def test_answers_and_kv_bytes_do_not_depend_on_the_batch():
    """The shipped tiny model (it stops on its own, at different steps per row) answers a mix of short,
    long and carried multi-turn conversations alone and in batches of 4: the same turns and the same
    KV bytes per turn (a row's last token is never cached within its turn, whichever row ends first)."""
    from harness.generate import answer
    from harness.models import load_model
    from harness.tasks import ShapesTask
    from helpers import cfg_for

    loaded = load_model(cfg_for("model=llava_tiny").model, "cpu")
    task = ShapesTask("shapes", "test", 12, ["colour", "count", "multiturn", "describe"], 64,
                      {"short": 8, "describe": 48, "long": 160})
    conversations = task.conversations(task.samples(None))
    alone = list(answer(loaded.model, loaded.processor, conversations, 1, "cpu"))
    batched = list(answer(loaded.model, loaded.processor, conversations, 4, "cpu"))
    assert [a.turns for a in alone] == [a.turns for a in batched]
    assert [a.kv_bytes for a in alone] == [a.kv_bytes for a in batched]
    assert len({len(a.turns[0].split()) for a in alone}) > 1  # rows end at different steps
