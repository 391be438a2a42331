"""a2jax.models.quant: int8 / fp8 weight-only quantization of the transformer blocks' kernels (per
output channel), the quantized Dense, the abstract tree and shardings, and sampling through
A2Pipeline with `transformer.weights` on one device and on 8 simulated devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2jax import configs, sharding
from a2jax.configs import TransformerConfig
from a2jax.errors import ConfigError
from a2jax.models import quant
from a2jax.models.transformer import A2Transformer, init_abstract_boxed, init_params
from a2jax.pipeline import A2Pipeline
from parity import rel_l2_err

KW = dict(num_attention_heads=2, attention_head_dim=8, in_channels=36, out_channels=16, text_dim=12,
          freq_dim=8, ffn_dim=24, num_layers=3, image_dim=10, added_kv_proj_dim=16)
# relative L2 of the tiny transformer's output, quantized against float32 weights (measured:
# int8 0.55 %, fp8 3.3 %); fp8 keeps 3 mantissa bits, int8 ~7 bits over each channel's range.
MODEL_TOL = {"int8": 0.015, "fp8": 0.06}
# relative L2 of the pipeline's final latents, quantized against the stored weights
LATENT_TOL = {"int8": 0.03}
SAMPLING = dict(frames=9, height=32, width=32, steps=3, guidance=5.0, shift=8.0, seed=0)


def _inputs(cfg, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, 1, 4, 6, cfg.in_channels)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((2, 5, cfg.text_dim)), jnp.float32)
  image = jnp.asarray(rng.standard_normal((2, 3, cfg.image_dim)), jnp.float32)
  return x, jnp.array([500.0, 20.0]), text, image


@pytest.mark.parametrize("weights", ["int8", "fp8"])
def test_round_trip_error_is_bounded_per_output_channel(weights):
  """Columns whose magnitudes span 3 decades: each keeps its own relative precision, which a
  per-tensor or per-input-row scale would lose (the small columns would round to zero)."""
  rng = np.random.default_rng(0)
  magnitudes = np.logspace(-3, 0, 32).astype(np.float32)
  w = rng.standard_normal((3, 64, 32)).astype(np.float32) * magnitudes
  q, scale = quant.quantize_kernel(jnp.asarray(w), weights)
  dtype, qmax = quant.FORMATS[weights]
  assert q.dtype == dtype and q.shape == w.shape and scale.shape == (3, 32)
  np.testing.assert_allclose(np.abs(np.asarray(q, np.float32)).max(axis=1), qmax)
  err = np.abs(np.asarray(quant.dequantize_kernel(q, scale)) - w)
  s = np.asarray(scale)[:, None, :]
  if weights == "int8":
    bound = s / 2 * (1 + 1e-5)                            # round to nearest on a grid of `scale`
  else:
    bound = np.maximum(np.abs(w) * 2.0**-4, s * 2.0**-10) * (1 + 1e-5)  # 3 mantissa bits; subnormals
  assert np.all(err <= bound)
  column_err = np.linalg.norm(err, axis=1) / np.linalg.norm(w, axis=1)
  assert column_err.max() <= {"int8": 0.02, "fp8": 0.05}[weights]


def test_zero_channel_keeps_scale_one():
  q, scale = quant.quantize_kernel(jnp.zeros((4, 2)).at[:, 1].set(1.0), "int8")
  np.testing.assert_array_equal(np.asarray(scale), np.float32([1.0, np.float32(1.0) / 127]))
  np.testing.assert_array_equal(np.asarray(q[:, 0]), 0)


def test_only_block_kernels_are_quantized():
  cfg = TransformerConfig(**KW)
  params = init_params(cfg, jax.random.key(0))
  quantized = quant.quantize_params(params, "int8")
  paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(quantized)}
  scales = sorted(p for p in paths if quant.SCALE in p)
  assert scales == sorted(f"['blocks']['{m}']['{n}']['{quant.SCALE}']" for m, n in [
      ("attn1", "to_q"), ("attn1", "to_k"), ("attn1", "to_v"), ("attn1", "to_out_0"),
      ("attn2", "to_q"), ("attn2", "to_k"), ("attn2", "to_v"), ("attn2", "to_out_0"),
      ("attn2", "add_k_proj"), ("attn2", "add_v_proj"), ("ffn", "net_0"), ("ffn", "net_2")])
  assert quantized["blocks"]["ffn"]["net_0"]["kernel"].dtype == jnp.int8
  # untouched leaves are the same arrays: biases, norms, modulation, embedders, head
  assert quantized["blocks"]["ffn"]["net_0"]["bias"] is params["blocks"]["ffn"]["net_0"]["bias"]
  assert quantized["blocks"]["scale_shift_table"] is params["blocks"]["scale_shift_table"]
  for name in ("condition_embedder", "patch_embedding", "proj_out", "scale_shift_table"):
    assert quantized[name] is params[name]
  assert quant.quantize_params(params, "native") is params
  with pytest.raises(ConfigError, match="quantized already"):
    quant.quantize_params(quantized, "fp8")


@pytest.mark.parametrize("weights", ["int8", "fp8"])
def test_quantized_transformer_against_float_weights(weights):
  """The quantized model equals the float model run on the dequantized kernels ((x @ q) · s =
  x @ (q · s)), and stays within MODEL_TOL of the float weights."""
  cfg = TransformerConfig(**KW)
  params = init_params(cfg, jax.random.key(0))
  quantized = quant.quantize_params(params, weights)
  dequantized = jax.tree.map(lambda x: x, params)
  for path in quant.target_paths(quantized):
    module = quant.module_at(quantized, path)
    target = quant.module_at(dequantized, path)
    target["kernel"] = quant.dequantize_kernel(module["kernel"], module[quant.SCALE])
  model = A2Transformer(cfg)
  run = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
  inputs = _inputs(cfg)
  ref, got = run(params, *inputs), run(quantized, *inputs)
  assert rel_l2_err(got, run(dequantized, *inputs)) <= 1e-5
  err = rel_l2_err(got, ref)
  print(f"{weights}: relative L2 against float32 weights {err:.4f}")
  assert 1e-4 < err <= MODEL_TOL[weights]


def test_abstract_tree_and_shardings_match_quantize_params():
  """quantize_abstract (the AOT's params) = eval_shape of quantize_params, and a quantization on a
  mesh keeps the kernel's sharding and gives the scale the kernel's output-axis sharding."""
  cfg = TransformerConfig(**KW)
  mesh = sharding.make_mesh(configs.MeshConfig(data=1, fsdp=2, context=1, tensor=4))
  boxed = init_abstract_boxed(cfg)
  abstract, shardings = sharding.unboxed_shardings(quant.quantize_abstract(boxed, "fp8"), mesh)
  params = init_params(cfg, jax.random.key(0), mesh)
  quantized = quant.quantize_params(params, "fp8")
  assert jax.tree.structure(abstract) == jax.tree.structure(quantized)
  for a, s, got in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings),
                       jax.tree.leaves(quantized)):
    assert (a.shape, a.dtype) == (got.shape, got.dtype)
    assert got.sharding.is_equivalent_to(s, got.ndim)
  to_q = shardings["blocks"]["attn1"]["to_q"]
  assert to_q[quant.SCALE].spec == jax.sharding.PartitionSpec(None, to_q["kernel"].spec[2])
  assert to_q["kernel"].spec[2] == "tensor"


def test_config_rejects_unknown_weights():
  with pytest.raises(ConfigError, match="weights"):
    TransformerConfig(**KW, weights="int4")


def _sample(pipe, images):
  sampling = dataclasses.replace(pipe.cfg.sampling, **SAMPLING)
  noise = np.random.default_rng(0).standard_normal((1, 3, 4, 4, 16)).astype(np.float32)
  return pipe("a man with a bear", [images[0]], images[1], noise=noise, sampling=sampling,
              progress=False)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(1)
  return rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), rng.integers(0, 256, (60, 90, 3),
                                                                         dtype=np.uint8)


def test_pipeline_samples_with_int8_weights_on_one_and_8_devices(release, images):
  native = A2Pipeline.from_folder(release[1])
  pipe = A2Pipeline.from_folder(release[1], overrides=["transformer.weights=int8"])
  assert pipe.cfg.transformer.weights == "int8"
  assert pipe.params["transformer"]["blocks"]["attn1"]["to_q"]["kernel"].dtype == jnp.int8
  ref, got = _sample(native, images), _sample(pipe, images)
  err = rel_l2_err(got.latents, ref.latents)
  print(f"int8 pipeline: relative L2 of the final latents against stored weights {err:.4f}")
  assert 0 < err <= LATENT_TOL["int8"]

  mesh = sharding.make_mesh(configs.MeshConfig(data=2, fsdp=1, context=2, tensor=2))
  sharded_pipe = A2Pipeline.from_folder(release[1], mesh=mesh,
                                        overrides=["transformer.weights=int8"])
  to_q = sharded_pipe.params["transformer"]["blocks"]["attn1"]["to_q"]
  assert len(to_q["kernel"].sharding.device_set) == 8
  assert to_q[quant.SCALE].sharding.spec[-1] == to_q["kernel"].sharding.spec[-1] == "tensor"
  sharded = _sample(sharded_pipe, images)
  assert rel_l2_err(sharded.latents, got.latents) <= 1e-5
  with pytest.raises(ConfigError, match="quantized already"):
    pipe.with_loras([object()])
