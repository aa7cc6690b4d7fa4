"""Adversarial contribution suite: one example moves the clipped sum by <= C.

Issue 19 (items 1, 3, 6). For each layer kind x path (auto/ghost,
materialized, jacobian) x precision x ``jit_compile``, an example crafted to
maximise its contribution (positions that cancel, huge magnitudes,
out-of-range ids, non-finite values) is put in a batch of benign examples and

  ``||sum(D) - sum(D without i)|| / C``

is measured through ``DPQuantOptimizer._compute_gradients`` with noise off
(``noise_multiplier=0``; ``expected_batch_size`` fixes the normalizer, so the
returned gradient times it is the clipped sum). The bound is ``1 + 1e-6``.
Hypothesis searches beside the hand-crafted cases.

Two measures of "D without i":
  * deterministic paths (float32, no gradient quantization): example i is
    removed (``np.delete``);
  * stochastic paths (16-bit gradient quantization, stochastic bf16 rounding,
    simulated FP8): example i is masked IN PLACE with the owned step's
    padding mask (sample weight 0, ``training._step.per_example_loss``, as
    ``poisson_dataset``'s ``(x, y, mask, seal)`` batches are applied), with
    every generator at the same state in both runs. The other examples' random
    draws are then identical, and the difference is example i's own clipped
    term: the coupling of the privacy argument (docs/PRIVACY.md, "Stochastic
    rounding and the coupling"). Removing i instead shifts the positional
    draws of the others, whose rounding noise would be measured as i's.
  The assumptions of that argument (no scale or draw of example j depends on
  example i) are tested at the end of this file.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest
import tensorflow as tf

import dpquant_tf  # noqa: F401  (Keras 2 first)
from dpquant_tf import perexample as pe
from dpquant_tf.perexample import _ghost
from dpquant_tf import quantization as qz
from dpquant_tf.optimizers import DPQuantOptimizer
from dpquant_tf.training import _step as owned_step

L = tf.keras.layers
B, T, K = 4, 4, 8
C = 1.0
NORM = 8.0   # expected_batch_size: the fixed normalizer
TOL = 1 + 1e-6
# "Contributes zero": what is left is the float32 rounding of the others'
# sum, which changes with the batch size (B vs B - 1 rows).
ZERO_TOL = 1e-5
_LOSS = tf.keras.losses.MeanSquaredError(reduction="none")


# ------------------------------------------------------------------ models
# One model holds every layer kind, each on the input it needs, so that one
# trace per (path, precision, jit) covers them all (the suite stays fast):
#   seq [T, K]:   Dense on a sequence (ghost: T^2 = 16 < K*O = 64), Dense to
#                 one unit (materialized: T^2 >= K*O), EinsumDense,
#                 LayerNormalization, GroupNormalization;
#   seq2 [2T, 4]: Conv1D patchify (kernel 2, stride 2; ghost);
#   img [4, 4, 2]: Conv2D patchify (4 patches of 2x2x2; ghost) and
#                 DepthwiseConv2D (materialized);
#   ids [T]:      Embedding (vocabulary 5).
SHAPES = {"seq": (T, K), "seq2": (2 * T, K // 2), "img": (4, 4, 2),
          "ids": (T,)}
VOCAB = 5


def _build():
  tf.keras.utils.set_random_seed(0)
  ins = {n: tf.keras.Input(s, name=n, dtype=tf.int32 if n == "ids" else None)
         for n, s in SHAPES.items()}
  gap1, gap2 = L.GlobalAveragePooling1D, L.GlobalAveragePooling2D
  seq, seq2, img, ids = ins["seq"], ins["seq2"], ins["img"], ins["ids"]
  feats = [
      gap1()(L.Dense(8, name="dense_seq")(seq)),
      gap1()(L.Dense(1, name="dense_seq_mat")(seq)),
      gap1()(L.EinsumDense("btk,ko->bto", (T, 8), bias_axes="o",
                           name="einsum")(seq)),
      gap1()(L.LayerNormalization(name="layernorm")(seq)),
      gap1()(L.GroupNormalization(2, name="groupnorm")(seq)),
      gap1()(L.Conv1D(8, 2, strides=2, name="conv1d")(seq2)),
      gap2()(L.Conv2D(8, 2, strides=2, name="conv2d")(img)),
      gap2()(L.DepthwiseConv2D(2, strides=2, name="depthwise")(img)),
      gap1()(L.Embedding(VOCAB, 4, name="embedding")(ids)),
  ]
  out = L.Dense(2, name="head")(L.Concatenate()(feats))
  return tf.keras.Model(ins, out)


QUANTIZABLE = ["dense_seq", "dense_seq_mat", "einsum", "conv1d", "conv2d",
               "depthwise"]


def _prepare(quantized):
  model = _build()
  if quantized:
    # Precision and gradient bits are variables: one trace serves every
    # setting (_configure assigns them before a run).
    cfg = qz.LayerQuantConfig(fwd_bits=0, bwd_bits=0)
    # The stochastic bf16 cast (not the default) is the case with draws.
    model = qz.quantize_model(model, layers=QUANTIZABLE, config=cfg, seed=0,
                              bf16_rounding="stochastic")
  return pe.tap_model(model)


def _generators(model, opt):
  """Every generator a step of `model` with `opt` draws from."""
  gens = [opt._generator]  # pylint: disable=protected-access
  gens += [layer.generator for layer in model.submodules
           if isinstance(layer, qz.QuantizedLayer)]
  return gens


@functools.lru_cache(maxsize=None)
def _trace(path, jit, quantized):
  """A function (inputs, sample weight) -> the clipped sum (float64 arrays)."""
  model = _prepare(quantized)
  opt = DPQuantOptimizer(
      C, 0.0, learning_rate=0.1, expected_batch_size=NORM, seed=0,
      per_example_method="jacobian" if path == "jacobian" else "auto")

  def step(x, weight):
    # "ghost": every layer with T^2 < K*O takes the ghost path (by default
    # only kernels of >= GHOST_MIN_KERNEL entries do; these are small).
    saved = _ghost.GHOST_MIN_KERNEL if hasattr(_ghost, "GHOST_MIN_KERNEL") else 0
    _ghost.GHOST_MIN_KERNEL = 1 if path == "ghost" else saved
    try:
      with tf.GradientTape() as tape:
        out = model(x, training=True)
        # The owned step's per-example loss: rows of weight 0 (the padding
        # of Poisson batches) get loss exactly 0.
        loss, _ = owned_step.per_example_loss(
            model, tf.zeros_like(out) + 1.0, out, weight, loss=_LOSS)
      # The owned step's binding (model and batch), without apply_gradients:
      # the suite reads the clipped sum itself.
      with opt._bind(model, x):  # pylint: disable=protected-access
        pairs = opt._compute_gradients(loss, model.trainable_variables, tape=tape)  # pylint: disable=protected-access
    finally:
      _ghost.GHOST_MIN_KERNEL = saved
    return [g * NORM for g, _ in pairs]

  # One trace for B and B - 1 examples (a dynamic batch).
  spec = {n: tf.TensorSpec((None,) + s, tf.int32 if n == "ids" else tf.float32)
          for n, s in SHAPES.items()}
  fn = tf.function(step, jit_compile=jit,
                   input_signature=[spec, tf.TensorSpec((None,), tf.float32)])
  gens = _generators(model, opt)
  states = [g.state.numpy() for g in gens]

  def run(x, weight=None):
    # A fixed step counter: every run draws the same random numbers.
    for g, state in zip(gens, states):
      g.state.assign(state)
    rows = len(x["ids"])
    weight = np.ones(rows, np.float32) if weight is None else weight
    return [t.numpy().astype(np.float64)
            for t in fn({n: tf.constant(v) for n, v in x.items()},
                        tf.constant(weight, tf.float32))]
  run.model = model
  run.opt = opt
  return run


def _stepper(path, precision, jit):
  """`_trace`'s function set to `precision` and, for "materialized", 16-bit
  gradients (the clip, quantize, re-clip path of per-example gradients).

  "materialized" shares the quantized model's ghost trace; the bf16 / FP8
  rows run the same trace with the layers' precision variable assigned.
  """
  quantized = precision != "fp32" or path == "materialized"
  trace_path = "ghost" if path == "materialized" else path
  fn = _trace(trace_path, jit, quantized)
  bits = 16 if path == "materialized" else 0
  layers = [l for l in fn.model.submodules if isinstance(l, qz.QuantizedLayer)]

  def run(x, weight=None):
    if getattr(fn, "setting", None) != (precision, bits):
      fn.opt.set_gradient_bits(bits)
      for layer in layers:
        layer.assign_config(qz.LayerQuantConfig(fwd_bits=0, bwd_bits=0,
                                                precision=precision))
      fn.setting = (precision, bits)
    return fn(x, weight)
  run.path = path
  # Paths with random draws: the coupled (masked in place) measure.
  run.stochastic = quantized
  return run


def _without(run, x, i):
  """The clipped sum of D without example i (removed, or masked in place)."""
  if run.stochastic:
    weight = np.ones(len(x["ids"]), np.float32)
    weight[i] = 0.0
    return run(x, weight)
  return run({n: np.delete(v, i, axis=0) for n, v in x.items()})


def _contribution(run, x, i):
  """||sum(D) - sum(D without i)|| / C (and the sums must be finite)."""
  with_i = run(x)
  without = _without(run, x, i)
  assert all(np.isfinite(a).all() for a in with_i), "a non-finite sum"
  assert all(np.isfinite(a).all() for a in without), "a non-finite sum"
  d = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(with_i, without)))
  return d / C


def _benign(seed=0):
  rng = np.random.default_rng(seed)
  x = {n: rng.normal(size=(B,) + s).astype(np.float32)
       for n, s in SHAPES.items() if n != "ids"}
  x["ids"] = rng.integers(0, VOCAB, size=(B, T)).astype(np.int32)
  return x


def _quiet_example_0(x):
  """Example 0 with zero float inputs and id 0 (only the attack speaks)."""
  for n, v in x.items():
    v[0] = 0
  return x


# ------------------------------------------------------- crafted inputs
def _cancelling(target, v, e):
  """Example 0: positions with rows V*e0 and -V*e0 + E*e1 (they cancel)."""
  x = _quiet_example_0(_benign())
  if target == "seq":      # Dense, EinsumDense, norms: rows 0 and 1
    x["seq"][0, 0, 0], x["seq"][0, 1, 0], x["seq"][0, 1, 1] = v, -v, e
  elif target == "seq2":   # Conv1D: patches are (2 steps x 4 channels)
    x["seq2"][0, 0, 0], x["seq2"][0, 2, 0], x["seq2"][0, 2, 1] = v, -v, e
  else:                    # Conv2D / DepthwiseConv2D: patch (0,0) and (0,1)
    x["img"][0, 0, 0, 0], x["img"][0, 0, 2, 0] = v, -v
    x["img"][0, 0, 2, 1] = e
  return x


def _cases():
  """name -> (inputs, exact zero expected?)."""
  cases = {}
  for target in ("seq", "seq2", "img"):
    for v, e in ((2.0 ** 20, 200.0), (2.0 ** 30, 2.0 ** 17)):
      cases[f"cancel-{target}-V{v:.0e}-E{e:.0e}"] = (_cancelling(target, v, e),
                                                    False)
    for bad in (3e38, -1e30, np.inf, np.nan):
      x = _quiet_example_0(_benign(1))
      x[target][0].flat[0] = bad
      cases[f"value-{target}-{bad}"] = (x, not np.isfinite(bad))
  for bad in ([5, 9, 23, 1000], [-1, 0, 1, 2], [2 ** 30, 1, 1, 1]):
    x = _benign(2)
    x["ids"][0] = bad
    cases[f"ids-{bad}"] = (x, True)
  return cases


def _check_all(run):
  """Every crafted case: ratio <= 1 + 1e-6 (~0 where it must be zero)."""
  bad = {}
  for name, (x, zero) in _cases().items():
    if run.path == "jacobian" and name.startswith("value-"):
      # Known limit (docs/PRIVACY.md): TF's jacobian mixes a non-finite
      # value of one example (an input, or an overflow in the backward pass
      # of 3e38 or -1e30 inputs) into every row (0 * NaN in the backward
      # matmul), so the whole batch is zeroed; only a finite release holds.
      assert all(np.isfinite(a).all() for a in run(x)), name
      continue
    ratio = _contribution(run, x, 0)
    if ratio > TOL or (zero and ratio > ZERO_TOL):
      bad[name] = ratio
  assert not bad, bad
  # Benign examples still train (the clip does not zero everything).
  assert _contribution(run, _benign(3), 1) > 0.0


_SLOW = pytest.mark.slow
# The default run stays near a minute: the default path (auto) and the ghost
# path of the cancellation attack in float32 without XLA (with the property
# search on the ghost trace). Every other row, the stochastic ones (16-bit
# gradients, bf16, FP8: one shared trace) and the jit rows, runs with
# `-m slow` (`make test-all`); all pass there.
STEPPERS = [
    ("auto", "fp32", False), ("ghost", "fp32", False),
    pytest.param("ghost", "fp32", True, marks=_SLOW),
    pytest.param("jacobian", "fp32", True, marks=_SLOW),
    pytest.param("materialized", "fp32", False, marks=_SLOW),
    pytest.param("ghost", "bf16", False, marks=_SLOW),
    pytest.param("ghost", "fp8", False, marks=_SLOW),
    pytest.param("materialized", "bf16", False, marks=_SLOW),
    pytest.param("auto", "fp32", True, marks=_SLOW),
    pytest.param("jacobian", "fp32", False, marks=_SLOW),
    pytest.param("materialized", "fp32", True, marks=_SLOW),
    pytest.param("ghost", "bf16", True, marks=_SLOW),
    pytest.param("ghost", "fp8", True, marks=_SLOW),
    pytest.param("jacobian", "bf16", True, marks=_SLOW),
    pytest.param("jacobian", "fp8", True, marks=_SLOW),
]


@pytest.mark.parametrize("path, precision, jit", STEPPERS)
def test_crafted_examples_move_the_sum_by_at_most_c(path, precision, jit):
  _check_all(_stepper(path, precision, jit))


@_SLOW
def test_in_range_ids_train_the_same_on_every_path():
  x = _benign(4)
  fast = _stepper("auto", "fp32", False)(x)
  for a, b in zip(fast, _stepper("jacobian", "fp32", True)(x)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_untapped_embedding_is_refused_before_the_first_step():
  tf.keras.utils.set_random_seed(0)
  inp = tf.keras.Input((T,), dtype=tf.int32)
  model = tf.keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling1D()(
      L.Embedding(VOCAB, 4, name="bare_embedding")(inp))))
  before = [w.copy() for w in model.get_weights()]
  model.compile(optimizer=DPQuantOptimizer(C, 0.0, learning_rate=0.1,
                                           per_example_method="jacobian"),
                loss=_LOSS)
  model.optimizer.install_train_step(model)   # the owned step (as fit's callbacks do)
  x = np.full((B, T), 2 ** 20, np.int32)
  with pytest.raises(ValueError, match="bare_embedding.*not tapped"):
    model.train_on_batch(x, np.zeros((B, 2), np.float32))
  for a, b in zip(model.get_weights(), before):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------- property search
_MAGS = st.sampled_from([0.0, 1.0, 2.0 ** 10, 2.0 ** 20, 2.0 ** 30, 2.0 ** 40,
                         2.0 ** 60, 1e-30])


@st.composite
def _attacks(draw):
  """Example 0 mixes cancelling huge entries and one small one in one input."""
  x = _quiet_example_0(_benign(draw(st.integers(0, 2 ** 16))))
  target = draw(st.sampled_from(["seq", "seq2", "img"]))
  flat = x[target][0].reshape(-1)
  n = flat.size
  v = draw(_MAGS)
  for _ in range(draw(st.integers(1, 4))):
    p, q = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
    sign = draw(st.sampled_from([1.0, -1.0]))
    flat[p] += sign * v
    flat[q] -= sign * v
  flat[draw(st.integers(0, n - 1))] += draw(st.sampled_from(
      [1.0, 200.0, 2.0 ** 17]))
  x[target][0] = flat.reshape(x[target][0].shape)
  return x


@pytest.mark.parametrize("path, jit", [
    ("ghost", False), pytest.param("jacobian", True, marks=_SLOW)])
def test_property_search(path, jit):
  run = _stepper(path, "fp32", jit)

  @hypothesis.settings(max_examples=8, deadline=None, derandomize=True,
                       suppress_health_check=list(hypothesis.HealthCheck))
  @hypothesis.given(_attacks())
  def check(x):
    assert _contribution(run, x, 0) <= TOL

  check()


# ------------------------------------------------------ the clip function
def test_clip_scales_never_exceed_c_over_the_bound():
  from dpquant_tf.privacy import _clip  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  bounds = np.concatenate([
      np.exp(rng.uniform(-100, 100, 2000)),       # any magnitude
      [1.0, 1.0 + 2 ** -30, 3e38, 1e300, 1e-300, 0.0, np.inf, np.nan]])
  clip = 0.7
  for dtype in (tf.float32, tf.float64):
    s = _clip.clip_scales(tf.constant(bounds), clip, dtype=dtype).numpy()
    s64 = s.astype(np.float64)
    finite = np.isfinite(bounds)
    assert (s64[~finite] == 0).all()
    assert (s64 <= 1.0).all() and (s64 >= 0).all()
    # fl(s * x) for |x| <= u: s * u (1 + u_dtype) <= C.
    unit = 2.0 ** -24 if dtype == tf.float32 else 2.0 ** -53
    prod = s64[finite] * bounds[finite] * (1 + unit)
    assert (prod <= clip).all(), prod.max()


def test_clip_per_example_of_float32_rows_is_at_most_c_in_float64():
  from dpquant_tf import privacy  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(6)
  rows = (rng.normal(size=(64, 300)) * np.exp(rng.uniform(-40, 40, (64, 1)))
          ).astype(np.float32)
  rows[0, :] = 1.0 / np.sqrt(300)                  # norm ~1 = C
  out = privacy.clip_per_example([tf.constant(rows)], 1.0)[0].numpy()
  norms = np.sqrt((out.astype(np.float64) ** 2).sum(axis=1))
  assert norms.max() <= 1.0, norms.max() - 1.0
  big = np.sqrt((rows.astype(np.float64) ** 2).sum(axis=1)) >= 1.0
  assert norms[big].min() > 1.0 - 1e-6


# ------------------------------------------ assumptions of the coupling
def test_masked_example_contributes_what_removing_it_does():
  """On the deterministic paths, masking example i in place (the owned
  step's padding mask) and removing it give the same clipped sum (up to the
  float32 rounding of the others' sum): the masked row adds exactly zero."""
  for key in (("ghost", "fp32", False), ("jacobian", "fp32", True)):
    run = _stepper(*key)
    for name, (x, _) in _cases().items():
      if key[0] == "jacobian" and name.startswith("value-"):
        continue  # the jacobian's known limit, see _check_all
      weight = np.ones(B, np.float32)
      weight[0] = 0.0
      masked = run(x, weight)
      removed = run({n: np.delete(v, 0, axis=0) for n, v in x.items()})
      d = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(masked, removed)))
      assert d <= ZERO_TOL, (key, name, d)


def _variants(x, i):
  """(inputs, sample weight) pairs that differ from (x, ones) in example i
  only: its values changed (huge, cancelling, non-finite, ids out of range),
  masked or not."""
  ones = np.ones(B, np.float32)
  masked = ones.copy()
  masked[i] = 0.0
  out = [(x, masked)]
  for change in ("huge", "cancel", "nan"):
    y = {n: v.copy() for n, v in x.items()}
    for n, v in y.items():
      if n == "ids":
        v[i] = [7, -1, 2 ** 30, 3]
      elif change == "huge":
        v[i] *= 1e30
      elif change == "cancel":
        v[i].flat[0], v[i].flat[1] = 2.0 ** 30, -2.0 ** 30
      else:
        v[i] = np.nan
    out += [(y, ones), (y, masked)]
  return out


@pytest.mark.parametrize("jit", [pytest.param(False, marks=_SLOW),
                                 pytest.param(True, marks=_SLOW)])
def test_no_scale_or_draw_of_example_j_depends_on_example_i(jit):
  """The coupling's assumptions (docs/PRIVACY.md): with every generator at one
  state, changing example i (masked or not) leaves example j's quantized
  activations (each quantized op's input), its per-example gradient (the
  backward quantizer's rounding included) and its 16-bit quantized clipped
  gradient bitwise unchanged, for INT4-SAWB forward / LUQ-FP4 backward
  quantization in float32, bf16 (stochastic rounding) and simulated FP8; and
  the masked example's clipped and quantized terms are exactly zero."""
  from dpquant_tf.privacy import _mechanisms  # pylint: disable=g-import-not-at-top
  from dpquant_tf.privacy import _random  # pylint: disable=g-import-not-at-top
  model = qz.quantize_model(_build(), layers=QUANTIZABLE, seed=0,
                            bf16_rounding="stochastic",
                            config=qz.LayerQuantConfig(fwd_bits=4, bwd_bits=4))
  model = pe.tap_model(model)
  quant = [l for l in model.submodules if isinstance(l, qz.QuantizedLayer)]
  assert len(quant) == len(QUANTIZABLE)
  variables = model.trainable_variables
  grad_gen = _random.make_generator(seed=1)
  gens = [grad_gen] + [l.generator for l in quant]
  spec = {n: tf.TensorSpec((None,) + s, tf.int32 if n == "ids" else tf.float32)
          for n, s in SHAPES.items()}

  @tf.function(jit_compile=jit,
               input_signature=[spec, tf.TensorSpec((None,), tf.float32)])
  def probe(x, weight):
    with tf.GradientTape() as tape:
      out = model(x, training=True)
      loss, _ = owned_step.per_example_loss(
          model, tf.zeros_like(out) + 1.0, out, weight, loss=_LOSS)
    grads = pe.per_example_gradients(loss, variables, tape, tf.shape(loss)[0])
    clipped = _mechanisms.clip_per_example(grads, C)
    quantized = _mechanisms.quantize_per_example(
        clipped, tf.fill([len(variables)], 16), C, grad_gen)
    return [l.tap_input for l in quant], grads, clipped, quantized

  states = [g.state.numpy() for g in gens]

  def run(x, weight):
    for g, state in zip(gens, states):
      g.state.assign(state)
    out = probe({n: tf.constant(v) for n, v in x.items()},
                tf.constant(weight))
    return tf.nest.map_structure(lambda t: t.numpy(), out)

  x, i = _benign(7), 1
  others = [j for j in range(B) if j != i]
  for precision in ("fp32", "bf16", "fp8"):
    for layer in quant:
      layer.assign_config(qz.LayerQuantConfig(fwd_bits=4, bwd_bits=4,
                                              precision=precision))
    base = run(x, np.ones(B, np.float32))
    for y, weight in _variants(x, i):
      taps, grads, clipped, quantized = run(y, weight)
      for a, b in zip(tf.nest.flatten(base), tf.nest.flatten(
          (taps, grads, clipped, quantized))):
        np.testing.assert_array_equal(a[others], b[others],
                                      err_msg=f"{precision}")
      if weight[i] == 0:
        for t in clipped + quantized:
          assert not np.any(t[i]), precision


@pytest.mark.parametrize("kind, precision", [
    pytest.param("dense", "fp8", marks=_SLOW),
    pytest.param("dense", "bf16", marks=_SLOW),
    pytest.param("conv1d", "fp8", marks=_SLOW)])
def test_quantized_layers_on_sequences_compile_under_xla(kind, precision):
  """Gradient and per-example jacobian of a QuantizedLayer on a sequence,
  dynamic batch, ``jit_compile=True``; same values as without XLA. Failed:
  Dense, "0 is duplicated in the input" (the gradient of tensordot's run-time
  transpose permutation inside the layer's conds); Conv1D, jacobian only,
  "Input to reshape is a tensor with N values, but the requested shape has
  0" (the squeeze of tf.nn.convolution's 1-D path inside the conds)."""
  tf.keras.utils.set_random_seed(0)
  inner = L.Dense(4) if kind == "dense" else L.Conv1D(4, 2, strides=2)
  layer = qz.QuantizedLayer(inner, fwd_bits=4, bwd_bits=4,
                            precision=precision, rounding="nearest")
  x = tf.constant(np.random.default_rng(0).normal(size=(3, T, K)),
                  tf.float32)
  layer(x)

  def step(x):
    grads = []
    for per_example in (False, True):   # one forward pass (tape) each
      with tf.GradientTape() as tape:
        out = layer(x, training=True)
        loss = tf.reduce_sum(tf.reshape(out, [tf.shape(out)[0], -1]) ** 2, 1)
        total = tf.reduce_sum(loss)
      variables = layer.trainable_variables
      grads += (tape.jacobian(loss, variables) if per_example
                else tape.gradient(total, variables))
    return grads

  spec = [tf.TensorSpec((None, T, K), tf.float32)]
  eager = tf.function(step, input_signature=spec)(x)
  xla = tf.function(step, jit_compile=True, input_signature=spec)(x)
  for a, b in zip(eager, xla):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-2, atol=1e-3)
