"""Model builders for DP training: Functional Keras models, no BatchNorm.

BatchNormalization couples the examples of a batch (training-mode statistics),
which breaks per-example gradient clipping (docs/METHOD.md, invariant 1). The ResNets
here use GroupNormalization, whose statistics are per example.

* :func:`tutorial_cnn`: the CNN of TF-Privacy's MNIST DP-SGD tutorial
  (Conv 16 8x8/2 same, MaxPool 2/1, Conv 32 4x4/2 valid, MaxPool 2/1, Dense 32,
  Dense logits).
* :func:`resnet18_gn`: ResNet-18 (He et al. 2016; basic blocks [2, 2, 2, 2],
  widths 64..512) with GroupNorm, a 3x3 stem for small images.
* :func:`small_resnet_gn`: a narrow ResNet ([1, 1, 1] blocks, widths 16/32/64)
  that trains on CPU in minutes.
* ``transformer`` / ``transformer_mini``: the BERT-like encoder classifier of
  :mod:`dpquant_tf.models._transformer` (presets "tiny" and "mini") on token
  ids.

Every builder returns logits (no softmax): train with
``SparseCategoricalCrossentropy(from_logits=True, reduction=NONE)``.
"""

import enum
from typing import Optional, Sequence, Tuple

from dpquant_tf import _validation

__all__ = ["ModelName", "build_model", "resnet18_gn", "small_resnet_gn",
           "tutorial_cnn"]


class ModelName(enum.Enum):
  """Models :func:`build_model` knows."""
  CNN = "cnn"
  RESNET18 = "resnet18"
  SMALL_RESNET = "small_resnet"
  TRANSFORMER = "transformer"            # preset "tiny"
  TRANSFORMER_MINI = "transformer_mini"  # preset "mini"


def _check_shape(input_shape, num_classes) -> Tuple[Tuple[int, ...], int]:
  shape = tuple(input_shape)
  if len(shape) != 3 or any(
      isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
    _validation.fail("input_shape", input_shape, "(height, width, channels) positive ints")
  return shape, _validation.check_int("num_classes", num_classes, low=2)


def tutorial_cnn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10,
                 *, name: str = "tutorial_cnn"):
  """TF-Privacy's MNIST tutorial CNN (Functional, logits out).

  Args:
    input_shape: (H, W, C); H and W at least 16 (the second conv is valid).
    num_classes: number of classes.
    name: model name.

  Returns:
    A ``tf.keras.Model`` with 4 quantizable layers: conv1, conv2, dense1, logits.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shape, num_classes = _check_shape(input_shape, num_classes)
  if min(shape[:2]) < 16:
    _validation.fail("input_shape", input_shape,
                     "at least 16x16 for the tutorial CNN (resize smaller images)")
  layers = tf.keras.layers
  inputs = tf.keras.Input(shape=shape, name="images")
  x = layers.Conv2D(16, 8, strides=2, padding="same", activation="relu",
                    name="conv1")(inputs)
  x = layers.MaxPool2D(2, 1, name="pool1")(x)
  x = layers.Conv2D(32, 4, strides=2, padding="valid", activation="relu",
                    name="conv2")(x)
  x = layers.MaxPool2D(2, 1, name="pool2")(x)
  x = layers.Flatten(name="flatten")(x)
  x = layers.Dense(32, activation="relu", name="dense1")(x)
  outputs = layers.Dense(num_classes, name="logits")(x)
  return tf.keras.Model(inputs, outputs, name=name)


def _groups(channels: int, groups: int) -> int:
  g = min(groups, channels)
  while channels % g:
    g -= 1
  return g


def _basic_block(x, filters: int, stride: int, groups: int, prefix: str):
  """Pre-activation-free basic block: conv-GN-relu-conv-GN (+ shortcut), relu."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  layers = tf.keras.layers
  shortcut = x
  y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                    name=f"{prefix}_conv1")(x)
  y = layers.GroupNormalization(_groups(filters, groups), name=f"{prefix}_gn1")(y)
  y = layers.ReLU(name=f"{prefix}_relu1")(y)
  y = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                    name=f"{prefix}_conv2")(y)
  y = layers.GroupNormalization(_groups(filters, groups), name=f"{prefix}_gn2")(y)
  if stride != 1 or shortcut.shape[-1] != filters:
    shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                             name=f"{prefix}_proj")(shortcut)
    shortcut = layers.GroupNormalization(_groups(filters, groups),
                                         name=f"{prefix}_proj_gn")(shortcut)
  y = layers.Add(name=f"{prefix}_add")([y, shortcut])
  return layers.ReLU(name=f"{prefix}_out")(y)


def _resnet(input_shape, num_classes, *, blocks: Sequence[int],
            widths: Sequence[int], stem_width: int, groups: int, name: str):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shape, num_classes = _check_shape(input_shape, num_classes)
  groups = _validation.check_int("groups", groups, low=1)
  layers = tf.keras.layers
  inputs = tf.keras.Input(shape=shape, name="images")
  x = layers.Conv2D(stem_width, 3, padding="same", use_bias=False,
                    name="stem_conv")(inputs)
  x = layers.GroupNormalization(_groups(stem_width, groups), name="stem_gn")(x)
  x = layers.ReLU(name="stem_relu")(x)
  for stage, (n_blocks, width) in enumerate(zip(blocks, widths)):
    for b in range(n_blocks):
      stride = 2 if (stage > 0 and b == 0) else 1
      x = _basic_block(x, width, stride, groups, f"s{stage + 1}b{b + 1}")
  x = layers.GlobalAveragePooling2D(name="pool")(x)
  outputs = layers.Dense(num_classes, name="logits")(x)
  return tf.keras.Model(inputs, outputs, name=name)


def resnet18_gn(input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
                *, groups: int = 32, name: str = "resnet18_gn"):
  """ResNet-18 with GroupNorm instead of BatchNorm (CIFAR-style 3x3 stem).

  Args:
    input_shape: (H, W, C).
    num_classes: number of classes.
    groups: GroupNorm groups (reduced to a divisor of the channel count).
    name: model name.

  Returns:
    A Functional ``tf.keras.Model`` (about 11.2M parameters) with 21
    quantizable layers (17 3x3 convs + 3 projections + the classifier).
  """
  return _resnet(input_shape, num_classes, blocks=(2, 2, 2, 2),
                 widths=(64, 128, 256, 512), stem_width=64, groups=groups,
                 name=name)


def small_resnet_gn(input_shape: Sequence[int] = (28, 28, 1),
                    num_classes: int = 10, *, groups: int = 4,
                    name: str = "small_resnet_gn"):
  """A narrow 3-stage ResNet with GroupNorm ([1, 1, 1] blocks, 16/32/64 wide).

  Returns:
    A Functional ``tf.keras.Model`` (about 80k parameters) with 10 quantizable
    layers.
  """
  return _resnet(input_shape, num_classes, blocks=(1, 1, 1),
                 widths=(16, 32, 64), stem_width=16, groups=groups, name=name)


def build_model(name, input_shape: Sequence[int], num_classes: int, *,
                vocab_size: Optional[int] = None):
  """Builds a model by :class:`ModelName` (or its lower-case name).

  Args:
    name: a :class:`ModelName` or its value.
    input_shape: (H, W, C) for the image models, (max_length,) for the
      transformers.
    num_classes: number of classes.
    vocab_size: token vocabulary size; required by the transformers, must be
      None for the image models.

  Example:
    >>> model = build_model("cnn", (28, 28, 1), 10)
    >>> text = build_model("transformer", (32,), 2, vocab_size=100)
  """
  kind = _validation.check_enum("model", name, ModelName)
  if kind in (ModelName.TRANSFORMER, ModelName.TRANSFORMER_MINI):
    from dpquant_tf.models import _transformer  # pylint: disable=g-import-not-at-top
    if vocab_size is None:
      _validation.fail("vocab_size", vocab_size,
                       f"the token vocabulary size for model {kind.value!r}")
    preset = "tiny" if kind is ModelName.TRANSFORMER else "mini"
    return _transformer.transformer_classifier(
        input_shape, num_classes, vocab_size=vocab_size, preset=preset,
        name=kind.value)
  if vocab_size is not None:
    _validation.fail("vocab_size", vocab_size,
                     f"None for the image model {kind.value!r}")
  builder = {ModelName.CNN: tutorial_cnn, ModelName.RESNET18: resnet18_gn,
             ModelName.SMALL_RESNET: small_resnet_gn}[kind]
  return builder(input_shape, num_classes)
