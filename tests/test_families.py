"""Lazy Attention on every multimodal family, against references computed here by hand.

Families: LLaVA with a Llama, Qwen2 or Mistral backbone, LLaVA-NeXT (Mistral), Qwen2-VL and
Qwen2.5-VL (M-RoPE), all tiny and random (harness.models.families). Then the model presets: the
``*_random`` ones have the real shapes (checked on the meta device, no weights) and run end to
end when scaled down; the ``hf`` ones read local checkpoints only, with no torchvision.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.models import families
from harness.generate import conversation, prompt_inputs
from harness.models.local import load_local
from harness.models.tiny import QWEN_VL_TOKENS
from harness.models import load_model
from harness.run import run
from harness.tasks import shapes
from lazyattn import LazyAttention, kv_cache_bytes
from lazyattn.arch import UnsupportedModelError, attention_family, decoder_layers

CONF = Path(__file__).resolve().parent.parent / "conf"
TEXT, CLIP, QWEN_VISION = families.TINY_TEXT, families.TINY_CLIP, families.TINY_QWEN_VISION
N_LAYERS = TEXT["layers"]
CASES = families.TINY_SHAPES


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    """(name, loaded model, left-padded inputs for 3 samples); q/k/v biases made non-zero."""
    family, text, vision = CASES[request.param]
    loaded = families.build_random(family, text, vision, initializer_range=0.2)
    torch.manual_seed(1)
    for layer in decoder_layers(loaded.model):
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            if proj.bias is not None:
                torch.nn.init.normal_(proj.bias, std=0.5)
    samples = _uneven_samples()
    images = [s.image(64) for s in samples]
    images[1] = images[1].resize((96, 64))  # a wide image: Qwen's grid is 3 x 4 merged patches, not square
    histories = [conversation(s.questions[:1], []) for s in samples]
    inputs = prompt_inputs(loaded.processor, histories, images, "cpu")
    assert (inputs["attention_mask"] == 0).any(), "the batch must be left-padded"
    return request.param, loaded, inputs


def _uneven_samples(n=3):
    """The first test samples whose first questions differ in length, so a batch is left-padded."""
    chosen = {}
    for sample in shapes.load_split("test", 24):
        chosen.setdefault(len(sample.questions[0].split()), sample)
    assert len(chosen) >= n
    return list(chosen.values())[:n]


def _text_config(model):
    return model.config.get_text_config(decoder=True)


def _image_token_ids(loaded):
    tok = loaded.processor.tokenizer
    names = QWEN_VL_TOKENS.values() if "image_grid_thw" in loaded.processor.model_input_names else ["<image>"]
    return [tok.convert_tokens_to_ids(t) for t in names]


@torch.no_grad()
def test_nothing_lazy_equals_dense(case):
    name, loaded, inputs = case
    model = loaded.model
    dense = model(**inputs, output_hidden_states=True)
    for method in (LazyAttention(layers=[]), LazyAttention(ratio=0.0)):
        with method.apply(model):
            assert torch.allclose(model(**inputs).logits, dense.logits, atol=1e-5, rtol=0)
    # Only the last layer lazy: layer N-2 runs the anchor forward; every hidden state up to it is dense's.
    with LazyAttention(layers=[N_LAYERS - 1]).apply(model):
        lazy = model(**inputs, output_hidden_states=True)
    for got, want in zip(lazy.hidden_states[:N_LAYERS], dense.hidden_states[:N_LAYERS]):
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert (lazy.logits - dense.logits).abs().max() > 1e-3


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _mrope_positions(input_ids, mask, image_token_id, grid_thw, merge):
    """Qwen2-VL's 3-D positions (temporal, height, width), by hand.

    Per row, over the unpadded tokens: a text token takes (p, p, p) and advances p by one; an
    image of t x h x w merged patches starting at p gives its patch (i, j, k) the position
    (p + i, p + j, p + k), after which text resumes at p + max(t, h, w).
    """
    b, n = input_ids.shape
    positions = torch.zeros(3, b, n, dtype=torch.long)
    grids = iter(grid_thw.tolist())
    for row in range(b):
        idx = mask[row].nonzero().flatten().tolist()
        p = k = 0
        while k < len(idx):
            if input_ids[row, idx[k]] != image_token_id:
                positions[:, row, idx[k]] = p
                p, k = p + 1, k + 1
                continue
            t, h, w = next(grids)
            h, w = h // merge, w // merge
            for m in range(t * h * w):
                i, rest = divmod(m, h * w)
                positions[:, row, idx[k + m]] = torch.tensor([p + i, p + rest // w, p + rest % w])
            p, k = p + max(t, h, w), k + t * h * w
    return positions


def _cos_sin(positions, theta, head_dim, sections=None):
    """RoPE tables in float64; with ``sections`` frequency band s uses position axis s (M-RoPE)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = positions[..., None].double() * inv_freq
    if sections is not None:  # positions (3, b, n): frequency j takes the axis its section names
        axis = torch.repeat_interleave(torch.arange(3), torch.tensor(sections))
        freqs = freqs[axis, :, :, torch.arange(head_dim // 2)].permute(1, 2, 0)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)


def _linear(x, proj):
    y = x @ proj.weight.double().T
    return y if proj.bias is None else y + proj.bias.double()


@torch.no_grad()
def test_lazy_layer_equals_hand_computed_attention(case):
    """Attn(Q_anchor, K_anchor, V_lazy) from the weights and hand-made RoPE, not from lazyattn."""
    name, loaded, inputs = case
    model = loaded.model
    layers = decoder_layers(model)
    anchor, lazy_layers = 1, [2, 3]
    captured = {}

    def keep_input(idx):
        return lambda module, args, kwargs: captured.__setitem__(f"in{idx}", kwargs["hidden_states"])

    def keep_output(idx):
        return lambda module, args, kwargs, output: captured.__setitem__(f"out{idx}", output[0])

    handles = [layers[i].self_attn.register_forward_pre_hook(keep_input(i), with_kwargs=True)
               for i in [anchor, *lazy_layers]]
    handles += [layers[i].self_attn.register_forward_hook(keep_output(i), with_kwargs=True) for i in lazy_layers]
    try:
        with LazyAttention(layers=lazy_layers).apply(model):
            model(**inputs)
    finally:
        for h in handles:
            h.remove()

    cfg = _text_config(model)
    a = layers[anchor].self_attn
    n_heads, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    x_a = captured[f"in{anchor}"].double()
    b, n, _ = x_a.shape
    q = _linear(x_a, a.q_proj).view(b, n, n_heads, d).transpose(1, 2)
    k = _linear(x_a, a.k_proj).view(b, n, n_kv, d).transpose(1, 2)
    mask = inputs["attention_mask"]
    theta = cfg.rope_parameters["rope_theta"]
    if "image_grid_thw" in inputs:
        image_token_id = loaded.processor.tokenizer.convert_tokens_to_ids(QWEN_VL_TOKENS["image_token"])
        merge = model.config.vision_config.spatial_merge_size
        positions = _mrope_positions(inputs["input_ids"], mask, image_token_id, inputs["image_grid_thw"], merge)
        cos, sin = _cos_sin(positions, theta, d, sections=[2, 3, 3])
    else:  # LLaVA: positions 0..n-1 in every row, padding included
        cos, sin = _cos_sin(torch.arange(n).expand(b, n), theta, d)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    pad = mask.bool()
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    for idx in lazy_layers:
        attn = layers[idx].self_attn
        v = _linear(captured[f"in{idx}"].double(), attn.v_proj).view(b, n, n_kv, d).transpose(1, 2)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        ref = _linear((probs @ v).transpose(1, 2).reshape(b, n, -1), attn.o_proj)
        got = captured[f"out{idx}"].double()
        # rows of padding tokens are undefined in every backend
        assert torch.allclose(got[pad], ref[pad], atol=1e-5, rtol=1e-4), (name, idx, (got[pad] - ref[pad]).abs().max())


def _full_forward_inputs(inputs, sequences, new):
    full = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    ones = torch.ones(sequences.shape[0], new, dtype=inputs["attention_mask"].dtype)
    full.update(input_ids=sequences, attention_mask=torch.cat([inputs["attention_mask"], ones], dim=1))
    if "mm_token_type_ids" in inputs:  # generated tokens are text
        types = inputs["mm_token_type_ids"]
        full["mm_token_type_ids"] = torch.cat([types, torch.zeros(types.shape[0], new, dtype=types.dtype)], dim=1)
    return full


@torch.no_grad()
def test_cached_generation_equals_uncached_forward(case):
    name, loaded, inputs = case
    model, new = loaded.model, 5
    blocked = _image_token_ids(loaded)  # an image token could not be fed back
    with LazyAttention(ratio=0.5).apply(model):
        out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             suppress_tokens=blocked, return_dict_in_generate=True, output_scores=True)
        full = model(**_full_forward_inputs(inputs, out.sequences, new)).logits
    n_prompt = inputs["input_ids"].shape[1]
    step_logits = torch.stack(out.scores, dim=1)
    full = full[:, n_prompt - 1 : -1]
    blocked.append(loaded.processor.tokenizer.eos_token_id)  # set to -inf before min_new_tokens
    full[..., blocked] = float("-inf")
    step_logits[..., blocked] = float("-inf")
    assert torch.allclose(full, step_logits, atol=1e-4, rtol=1e-4), name
    assert torch.equal(full.argmax(-1), out.sequences[:, n_prompt:])


@pytest.mark.parametrize("lazy", [[1], [2, 3], [1, 2, 3]])
@torch.no_grad()
def test_kv_bytes_formula(case, lazy):
    name, loaded, inputs = case
    model = loaded.model
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                  suppress_tokens=_image_token_ids(loaded))
    dense = model.generate(**inputs, **kwargs)
    with LazyAttention(layers=lazy).apply(model):
        out = model.generate(**inputs, **kwargs)
    cfg = _text_config(model)
    seq = dense.sequences.shape[1] - 1  # the last token is sampled, not cached
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    dense_bytes, lazy_bytes = kv_cache_bytes(dense.past_key_values), kv_cache_bytes(out.past_key_values)
    assert dense_bytes == 2 * N_LAYERS * inputs["input_ids"].shape[0] * cfg.num_key_value_heads * seq * head_dim * 4
    assert lazy_bytes * (2 * N_LAYERS) == dense_bytes * (2 * N_LAYERS - len(lazy))
    assert all(out.past_key_values.layers[i].keys is None for i in lazy)


# ---- model presets ------------------------------------------------------------------------------

# The published shapes (docs/gpu.md): layers, hidden, heads, kv heads, MLP; and the published parameter counts
REAL_SHAPES = {
    "llava15_7b_random": ((32, 4096, 32, 32, 11008), 7.06e9),
    "llava15_13b_random": ((40, 5120, 40, 40, 13824), 13.35e9),
    "llava_next_mistral_7b_random": ((32, 4096, 32, 8, 14336), 7.57e9),
    "llava_next_vicuna_7b_random": ((32, 4096, 32, 32, 11008), 7.06e9),
    "llava_next_vicuna_13b_random": ((40, 5120, 40, 40, 13824), 13.35e9),
    "qwen2_vl_7b_random": ((28, 3584, 28, 4, 18944), 8.29e9),
    "qwen25_vl_7b_random": ((28, 3584, 28, 4, 18944), 8.29e9),
}
HF_PRESETS = {"llava15_7b": "llava", "llava15_13b": "llava", "llava_next_mistral_7b": "llava_next",
              "llava_next_vicuna_7b": "llava_next", "llava_next_vicuna_13b": "llava_next",
              "qwen2_vl_7b": "qwen2_vl", "qwen25_vl_7b": "qwen2_5_vl"}


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("preset", sorted(REAL_SHAPES))
def test_random_preset_has_the_real_shape(preset):
    """Config only, then the module tree on the meta device: no weights are allocated."""
    m = compose_cfg(f"model={preset}").model
    assert m.kind == "random_shape" and m.name == preset
    config = families.random_config(m.family, OmegaConf.to_container(m.text), OmegaConf.to_container(m.vision))
    text = config.get_text_config(decoder=True)
    shape = (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
             text.intermediate_size)
    assert shape == REAL_SHAPES[preset][0]
    with torch.device("meta"):
        model = families.MODEL_CLASSES[m.family]._from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == pytest.approx(REAL_SHAPES[preset][1], rel=0.005)
    assert len(decoder_layers(model)) == shape[0]
    attention_family(decoder_layers(model)[0].self_attn)  # a supported attention class
    if m.family.startswith("qwen"):
        assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    if m.family.startswith("llava"):  # CLIP ViT-L/14-336 (its penultimate layer feeds the projector)
        v = config.vision_config
        assert (v.num_hidden_layers, v.hidden_size, v.patch_size, v.image_size) == (24, 1024, 14, 336)
        assert config.vision_feature_layer == -2
    if m.family == "llava_next":  # anyres over LLaVA-NeXT's five default grids
        assert config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    if preset.startswith(("llava15", "llava_next_vicuna")):  # Vicuna is a Llama
        assert text.model_type == "llama" and text.rope_parameters["rope_theta"] == 10000.0


TINY_OVERRIDES = {"llava": CLIP, "llava_next": CLIP, "qwen2_vl": QWEN_VISION, "qwen2_5_vl": QWEN_VISION}


@pytest.mark.parametrize("preset", ["llava15_7b_random", "llava_next_mistral_7b_random",
                                    "llava_next_vicuna_7b_random", "qwen2_vl_7b_random", "qwen25_vl_7b_random"])
def test_tiny_scaled_random_preset_runs_lazy_end_to_end(preset, tmp_path):
    """The preset scaled down (text and vision sizes only): a full harness run with Lazy Attention."""
    cfg = compose_cfg(f"model={preset}", "method=lazy", "method.ratio=0.5", "limit=2", "batch_size=2",
                      "device=cpu", "model.dtype=float32", f"out_dir={tmp_path}", "efficiency.new_tokens=2",
                      "efficiency.repeats=1", "efficiency.warmup=0", "wandb.mode=disabled")
    family = cfg.model.family
    text = {k: v for k, v in TEXT.items()}
    if family.startswith("qwen"):
        text["mrope_section"] = [2, 3, 3]
    vision = {k: v for k, v in TINY_OVERRIDES[family].items() if family == "qwen2_5_vl" or k != "window_size"}
    cfg.model.text = OmegaConf.merge(cfg.model.text, {**text, "vocab": None})
    cfg.model.vision = OmegaConf.merge(cfg.model.vision, vision)
    if family == "qwen2_5_vl":
        cfg.model.vision.fullatt_blocks = [1]
    if family == "llava_next":
        cfg.model.vision.grid_pinpoints = [[32, 64], [64, 32], [64, 64]]
    result = json.loads(run(cfg).read_text())
    assert result["model"]["name"] == preset and result["model"]["n_layers"] == N_LAYERS
    assert result["method"]["lazy_layers"] == [1, 3]
    assert result["efficiency"]["kv_reduction"] == pytest.approx(2 / (2 * N_LAYERS), abs=1e-12)
    assert result["tasks"]["shapes"]["n"] == 2


@pytest.mark.parametrize("preset", sorted(HF_PRESETS))
def test_hf_preset_needs_a_local_path(preset, tmp_path):
    m = compose_cfg(f"model={preset}").model
    assert m.kind == "hf" and m.model_type == HF_PRESETS[preset]
    with pytest.raises(ValueError, match="model.path is not set"):
        load_model(m)
    m.path = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(m)


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    """A tiny Qwen2-VL saved as the real checkpoints are laid out: preprocessor_config.json naming
    Qwen2VLProcessor and the torchvision image processor class."""
    loaded = families.build_random("qwen2_vl", {**TEXT, "layers": 2, "mrope_section": [2, 3, 3]}, QWEN_VISION)
    path = tmp_path_factory.mktemp("qwen2_vl_ckpt")
    loaded.model.save_pretrained(path)
    loaded.processor.save_pretrained(path)
    image_processor = json.loads((path / "processor_config.json").read_text())["image_processor"]
    (path / "processor_config.json").unlink()
    image_processor.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2VLProcessor")
    (path / "preprocessor_config.json").write_text(json.dumps(image_processor))
    return loaded, path


@torch.no_grad()
def test_local_qwen2_vl_checkpoint_loads_without_torchvision(qwen_checkpoint, tmp_path):
    loaded, path = qwen_checkpoint
    cfg = compose_cfg("model=qwen2_vl_7b", f"model.path={path}", "model.dtype=float32").model
    local = load_model(cfg)
    assert type(local.processor).__name__ == "Qwen2VLImageTextProcessor"
    assert type(local.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    samples = shapes.load_split("test", 2)
    histories = [conversation(s.questions[:1], []) for s in samples]
    images = [s.image(64) for s in samples]
    want = prompt_inputs(loaded.processor, histories, images, "cpu")
    got = prompt_inputs(local.processor, histories, images, "cpu")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with LazyAttention(layers=[1]).apply(local.model):
        lazy = local.model(**got).logits
    with LazyAttention(layers=[1]).apply(loaded.model):
        assert torch.allclose(lazy, loaded.model(**want).logits, atol=1e-5, rtol=0)
    wrong = shutil.copytree(path, tmp_path / "ckpt")
    cfg.path = str(wrong)
    cfg.model_type = "llava"
    with pytest.raises(ValueError, match="expects model_type 'llava'"):
        load_model(cfg)


# ---- what is not supported -----------------------------------------------------------------------


def test_a_sequence_outgrowing_a_sliding_window_is_refused():
    """Installing on a windowed model works (tests/test_windows.py has the rest); a cached sequence
    longer than the window that a lazy layer shares with its anchor is refused in one line."""
    from transformers import DynamicCache, MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, sliding_window=8)).eval()
    ids = torch.randint(0, 32, (1, 12))
    with LazyAttention(layers=[1]).apply(model), torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="outgrew the sliding window of 8 tokens"):
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)


def test_per_axis_mrope_tables_are_refused(case):
    name, loaded, _ = case
    family = attention_family(decoder_layers(loaded.model)[0].self_attn)
    q = k = torch.zeros(1, 4, 5, 16)
    family.rotary(q, k, torch.ones(1, 5, 16), torch.zeros(1, 5, 16))
    with pytest.raises(UnsupportedModelError, match="M-RoPE"):
        family.rotary(q, k, torch.ones(3, 1, 5, 16), torch.zeros(3, 1, 5, 16))


@pytest.mark.parametrize(
    "family, text, vision, message",
    [
        ("gemma3", TEXT, CLIP, "model.family must be one of"),
        ("llava", {**TEXT, "backbone": "gpt2"}, CLIP, "backbone must be one of"),
        ("llava", {**TEXT, "depth": 3}, CLIP, "unknown keys"),
        ("llava", {k: v for k, v in TEXT.items() if k != "heads"}, CLIP, r"needs \['heads'\]"),
        ("qwen2_vl", {**TEXT, "mrope_section": [4, 4, 4]}, QWEN_VISION, "summing to head_dim / 2 = 8"),
    ],
)
def test_bad_shape_is_a_clear_error(family, text, vision, message):
    with pytest.raises(ValueError, match=message):
        families.random_config(family, text, vision)
