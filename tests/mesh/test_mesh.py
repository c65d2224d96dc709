"""One model over 8 devices: the same logits and tokens as on one device, on every mesh shape tried.

Each family is converted once and loaded on one device and on a mesh: every mesh shape serves a family or
two (the suite's time grows with families x meshes; one row on 8 data shards and int8 weights add
others); meshes are made by `jax.make_mesh` (Explicit axes, as users get them).
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

import jaxvlm
from jaxvlm.generate import MAX_CHUNK, batch_bucket, cache_bucket
from convert import convert
from tests import hf_models

MESHES = {"2x4": ((2, 4), ("data", "model")), "1x8": ((1, 8), ("data", "model")),
          "8x1": ((8, 1), ("data", "model")), "fsdp": ((2, 2, 2), ("data", "fsdp", "model"))}
TEXT_FAMILIES = {"gemma2": {}, "qwen3_mqa": {"num_key_value_heads": 1}}  # (Gemma 3's decoder: the VLM's)
VLMS = ["paligemma", "llava_phi3", "gemma3", "qwen_vl", "qwen3_vl"]
IMAGES_PER_ROW = {"gemma3": [1, 2, 1]}  # several images a row; the others take one (but Qwen-VL's, of any size)
QWEN_VL_GRIDS = [[(1, 4, 6)], [(1, 6, 4), (1, 2, 2)], [(1, 2, 4)]]  # images of any size, as patch grids
MESHES_OF = {"gemma2": ["2x4"], "qwen3_mqa": ["1x8"], "paligemma": ["8x1"], "llava_phi3": ["fsdp"],
             "gemma3": ["1x8"], "qwen_vl": ["2x4"], "qwen3_vl": ["fsdp"]}
NEW_TOKENS = 10


def test_there_are_8_devices():
    assert jax.device_count() == 8


@pytest.fixture(scope="module", params=list(TEXT_FAMILIES) + VLMS)
def family(request, tmp_path_factory):
    """(name, converted folder, inputs for logits and generation, one-device logits and tokens)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    if name in ("qwen_vl", "qwen3_vl"):
        hf = hf_models.build_qwen_vl("qwen2_5_vl" if name == "qwen_vl" else name, seed=4)
        rows = hf_models.qwen_vl_prompts(1, QWEN_VL_GRIDS)
        grids = [g for row in QWEN_VL_GRIDS for g in row]
        inputs = {"pixel_values": hf_models.patch_values(0, grids, patch=14 if name == "qwen_vl" else 16),
                  "image_grid_thw": np.asarray(grids)}
    elif name in IMAGES_PER_ROW:
        hf = hf_models.build_vlm(name, seed=8)
        rows = hf_models.gemma3_prompts(1, IMAGES_PER_ROW[name])
        inputs = {"pixel_values": hf_models.pixels(0, sum(IMAGES_PER_ROW[name]))}
    elif name in VLMS:
        hf = hf_models.build_vlm(name, seed=4)
        rows = hf_models.vlm_prompts(name, 1, [5, 9, 7])
        inputs = {"pixel_values": hf_models.pixels(0, 3)}
    else:
        hf = hf_models.build(name.removesuffix("_mqa"), seed=4, **TEXT_FAMILIES[name])
        rows = hf_models.prompts(1, [5, 13, 9])
        inputs = {}
    folder = convert(hf_models.save(hf, str(root / "hf")), str(root / "jax"), progress=False)
    ids, mask = hf_models.left_pad(rows)
    inputs.update(input_ids=ids, attention_mask=mask)
    one = jaxvlm.load(folder)
    return name, folder, inputs, one.logits(**inputs), one.generate_ids(**inputs, max_new_tokens=NEW_TOKENS)


def mesh(name):
    shape, axes = MESHES[name]
    return jax.make_mesh(shape, axes)


COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\]\S* (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                        r"(?:-start)?\(")


def test_every_family_and_mesh_shape_is_tried():
    used = {m for meshes in MESHES_OF.values() for m in meshes}
    assert set(MESHES_OF) == set(TEXT_FAMILIES) | set(VLMS) and used == set(MESHES)


def test_a_mesh_gives_the_one_device_logits_and_tokens(family):
    """Three rows: padded to their bucket, 4 rows, and to 8 on (8, 1), the copies dropped again. With a `model`
    axis, most parameter bytes are split; without `fsdp`, decoding moves activations (all-reduces of
    partial sums, small gathers of per-shard results), never a weight gathered whole."""
    for mesh_name in MESHES_OF[family[0]]:
        _check_mesh(family, mesh_name)


def _check_mesh(family, mesh_name):
    name, folder, inputs, logits, tokens = family
    model = jaxvlm.load(folder, mesh=mesh(mesh_name))
    diff = np.abs(model.logits(**inputs) - logits).max()
    assert diff <= 1e-4, f"{name} on {mesh_name}: max |logits diff| {diff}"
    np.testing.assert_array_equal(model.generate_ids(**inputs, max_new_tokens=NEW_TOKENS), tokens)
    if mesh_name == MESHES_OF[name][0] and name not in IMAGES_PER_ROW:
        _check_engine(model, inputs, tokens)
    if model.shard.size.get("model", 1) > 1:
        leaves = jax.tree.leaves(model.params)
        split = sum(x.nbytes for x in leaves if not x.sharding.is_fully_replicated)
        total = sum(x.nbytes for x in leaves)
        assert split > total / 2, f"{name} on {mesh_name}: {split} of {total} bytes split"
    if "fsdp" not in model.shard.size:
        weights = {int(np.prod(x.shape)) for x in jax.tree.leaves(model.params) if x.ndim >= 2}
        size = lambda shape: int(np.prod([int(d) for d in shape.split(",") if d]))
        # (the program generate_ids ran: greedy, its cache)
        collectives = COLLECTIVE.findall(model.decode_program(**inputs, max_new_tokens=NEW_TOKENS))
        assert collectives or model.shard.size["data"] == 8, "a tensor-parallel model should communicate"
        # A weight gathered whole is a float array of a weight's size (token ids are gathered as int32); the
        # per-shard best values of the argmax, [rows, shards], are no weight whatever their size, nor are
        # the logits [rows, vocab] (a sampling row sorts them), nor a call's log-probabilities,
        # [rows, MAX_CHUNK], copied for every host to read.
        rows = batch_bucket(len(inputs["input_ids"]), model.shard.batch_multiple)
        activations = {f"{rows},{model.shard.size.get('model', 1)}", f"{rows},{model.config.decoder.vocab_size}",
                       f"{rows},{MAX_CHUNK}"}
        whole = [(dtype, shape) for dtype, shape, op in collectives
                 if op == "all-gather" and dtype.startswith(("f", "bf")) and size(shape) in weights
                 and shape not in activations]
        assert not whole, f"{name} on {mesh_name}: the decode step gathers {whole}"


def _check_engine(model, inputs, tokens):
    """The engine on the mesh: rows arriving one a step into its slots get the one-device tokens. The slots
    and cache are those `generate_ids` made for the batch, so that the two share their decode program."""
    from jaxvlm.engine import Engine, Request, cache_slots
    ids, mask, prefix, pixels = model._inputs(inputs["input_ids"], inputs["attention_mask"],
                                              inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"))
    # (each request its own LongRoPE factors, as alone; the batch here switches them together: compare the
    # tokens before the longest row passes the short factors' positions)
    rope = model.config.decoder.rope
    max_tokens = NEW_TOKENS if not rope.is_longrope else rope.original_max_position - ids.shape[1]
    size = cache_bucket(max(cache_slots(model.config, int(keep.sum()), max_tokens) for keep in mask))
    engine = Engine(model, slots=batch_bucket(len(mask), model.shard.batch_multiple), cache_size=size, chunk=4)
    submitted = []
    for i, keep in enumerate(mask):
        submitted.append(engine.submit(Request(tokens=ids[i][keep], pixels=None if pixels is None else pixels.of_row(i),
                                               prefix=None if prefix is None else prefix[i][keep],
                                               max_tokens=max_tokens)))
        engine.step()
    done = engine.run()
    for i, request_id in enumerate(submitted):
        got = done[request_id].tokens
        assert got == list(tokens[i][:len(got)]), f"row {i} on {model.shard.size}"


def test_rules_split_what_divides_and_use_each_mesh_axis_once():
    from jaxvlm.sharding import MeshRules
    from jax.sharding import PartitionSpec as P
    shard = MeshRules.create(mesh("fsdp"))
    assert shard.spec(("embed", "kv_heads", "head_dim"), (64, 1, 16)) == P("fsdp", None, None)  # MQA: one kv head
    assert shard.spec(("embed", "heads", "head_dim"), (64, 4, 16)) == P("fsdp", "model", None)
    assert shard.spec(("embed", "embed"), (64, 64)) == P("fsdp", None)  # a projector: fsdp used once
    assert shard.spec(("vocab", "embed"), (255, 64)) == P(None, "fsdp")  # 255 rows do not split in two
    assert shard.spec(("batch", None), (4, 9)) == P(("data", "fsdp"), None)
    custom = MeshRules.create(mesh("2x4"), rules={"embed": "model", "mlp": None})
    assert custom.spec(("embed", "mlp"), (64, 128)) == P("model", None)


# (DeepStack's additions picked by layer index; Gemma 3's local and global layers in one scan beside an
# image encoder's stack: test_int8_weights_on_a_mesh)
@pytest.mark.parametrize("family", ["qwen3_vl"], indirect=True)
def test_stacked_layers_on_a_mesh(family):
    """Stacked [L, ...] params split like the unrolled ones (the layer axis stays whole)."""
    name, folder, inputs, logits, tokens = family
    model = jaxvlm.load(folder, mesh=mesh("2x4"), scan_layers=True)
    kernel = model.params["decoder"]["layers"]["mlp"]["up"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    assert np.abs(model.logits(**inputs) - logits).max() <= 1e-4
    np.testing.assert_array_equal(model.generate_ids(**inputs, max_new_tokens=NEW_TOKENS), tokens)


# (a text row, a row of several images, a row of images of any size: the padding copies what the row holds)
@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen_vl"], indirect=True)
def test_a_batch_the_data_axis_does_not_divide_is_padded(family):
    """One row on 8 data shards: padded with seven copies of it, which are dropped again."""
    name, folder, inputs, logits, tokens = family
    model = jaxvlm.load(folder, mesh=mesh("8x1"))
    one_row = {k: v[1:2] for k, v in inputs.items()}
    if name in ("qwen_vl", "qwen3_vl"):  # the patches of row 1's images
        _, _, _, images = model._inputs(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                        image_grid_thw=inputs["image_grid_thw"])
        one_row.update(pixel_values=images.of_row(1).values, image_grid_thw=images.of_row(1).grids)
    elif name in IMAGES_PER_ROW:  # the images of row 1
        start = IMAGES_PER_ROW[name][0]
        one_row["pixel_values"] = inputs["pixel_values"][start:start + IMAGES_PER_ROW[name][1]]
    got = model.generate_ids(**one_row, max_new_tokens=NEW_TOKENS)
    assert got.shape == (1, NEW_TOKENS)
    np.testing.assert_array_equal(got[0], tokens[1])


@pytest.mark.parametrize("family", ["gemma3"], indirect=True)  # local and global layers; a VLM's encoder too
def test_int8_weights_on_a_mesh(family):
    """int8 weights and their scales split by the same rules (a scale is named as its weight), stacked
    (the layer axis whole) over data, fsdp and model: the logits and tokens of the int8 model on one
    device (which runs the fused CPU kernel; the mesh runs XLA's)."""
    name, folder, inputs, _, _ = family
    one = jaxvlm.load(folder, quantize="int8")
    model = jaxvlm.load(folder, mesh=mesh("fsdp"), scan_layers=True, quantize="int8")
    up = model.params["decoder"]["layers"]["mlp"]["up"]
    assert up["kernel"].dtype == np.int8
    scale, kernel = up["kernel_scale"], up["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "model")
    expected = [None if n == 1 else axis for n, axis in zip(scale.shape, kernel.sharding.spec)]  # 1: whole
    assert list(scale.sharding.spec) + [None] * (scale.ndim - len(scale.sharding.spec)) == expected
    assert np.abs(model.logits(**inputs) - one.logits(**inputs)).max() <= 1e-4
    np.testing.assert_array_equal(model.generate_ids(**inputs, max_new_tokens=NEW_TOKENS),
                                  one.generate_ids(**inputs, max_new_tokens=NEW_TOKENS))


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """Qwen3-MoE (8 experts, a dense layer between two mixtures): (folder, ids, mask, one-device logits and
    tokens)."""
    root = tmp_path_factory.mktemp("moe")
    folder = convert(hf_models.save(hf_models.build("qwen3_moe", seed=4), str(root / "hf")), str(root / "jax"),
                     progress=False)
    ids, mask = hf_models.left_pad(hf_models.prompts(1, [5, 13, 9]))
    one = jaxvlm.load(folder)
    return folder, ids, mask, one.logits(ids, mask), one.generate_ids(ids, mask, max_new_tokens=NEW_TOKENS)


@pytest.mark.parametrize("shape, axes", [((2, 4), ("data", "expert")), ((2, 2, 2), ("data", "expert", "model"))])
def test_experts_split_over_the_expert_axis(moe, shape, axes):
    """Each expert-axis device holds its share of every expert stack, and the mesh gives the one-device
    logits and tokens."""
    folder, ids, mask, logits, tokens = moe
    model = jaxvlm.load(folder, mesh=jax.make_mesh(shape, axes))
    experts = model.params["decoder"]["layer_0"]["mlp"]
    for name in ("gate", "up", "down"):
        assert experts[name].sharding.spec[0] == "expert", (name, experts[name].sharding.spec)
    diff = np.abs(model.logits(ids, mask) - logits).max()
    assert diff <= 1e-4, f"max |logits diff| {diff}"
    np.testing.assert_array_equal(model.generate_ids(ids, mask, max_new_tokens=NEW_TOKENS), tokens)


def test_serve_on_a_mesh():
    """`jaxvlm serve --mesh data=2,model=4`: the built-in model over the 8 devices answers as on one."""
    import base64
    import openai
    from tests.servers import Server
    server = Server("--mesh", "data=2,model=4", "--slots", "4")
    try:
        with open("examples/shapes.png", "rb") as f:
            url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(model="jaxvlm-shapes", max_tokens=20, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "caption en"}]}])
        assert answer.choices[0].message.content == jaxvlm.load().generate("caption en", image="examples/shapes.png",
                                                                           max_new_tokens=20)
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("name", ["windowed", "causal"])  # kv heads split over 'model', and one kv head for all
def test_splash_attention_per_device_on_a_mesh(name):
    """The kernel under shard_map (Pallas' interpret mode) on a data=4, model=2 mesh: the one-device
    einsum path's logits; the windowed layers with PaliGemma 2's prefix (a block past the window)."""
    import flax.linen as nn
    import jax.numpy as jnp
    from jaxvlm import splash
    from jaxvlm.checkpoint import param_axes
    from jaxvlm.config import ModelConfig
    from jaxvlm.generate import right_align
    from jaxvlm.inputs import Inputs
    from jaxvlm.kv_cache import KVCache
    from jaxvlm.sharding import MeshRules
    from jaxvlm.vlm import VisionLanguageModel
    from tests.test_splash import CONFIGS

    config = ModelConfig(decoder=CONFIGS[name])
    rng = np.random.default_rng(0)
    tokens, valid = right_align([rng.integers(1, 128, size=n) for n in (128, 75, 100, 128)], 128, 0)
    model = VisionLanguageModel(config, jnp.float32)
    params = nn.meta.unbox(model.init(jax.random.key(1), Inputs.build(config, tokens, valid))["params"])
    cache = KVCache.init(config.decoder, 4, 256, jnp.float32)
    index = np.arange(128)[None] - (128 - valid.sum(axis=1))[:, None]  # each token's place in its row
    prefix = index < 70 if name == "windowed" else None
    run = lambda params, tokens, valid, prefix: model.apply(
        {"params": params}, Inputs.build(config, tokens, valid, prefix), cache).logits
    want = np.asarray(jax.jit(run)(params, tokens, valid, prefix))
    shard = MeshRules.create(jax.make_mesh((4, 2), ("data", "model")))
    placed = jax.device_put(params, shard.params(param_axes(config), params))
    q = jax.ShapeDtypeStruct((4, 128, CONFIGS[name].num_heads, 32), jnp.float32)
    k = jax.ShapeDtypeStruct((4, 128, CONFIGS[name].num_kv_heads, 32), jnp.float32)
    with splash.use(shard, interpret=True):
        assert splash.supported(q, k)
        got = np.asarray(jax.jit(run)(placed, shard.put(tokens, ("batch",)), shard.put(valid, ("batch",)),
                                      None if prefix is None else shard.put(prefix, ("batch",))))
    np.testing.assert_allclose(got[valid], want[valid], rtol=2e-5, atol=2e-5)
