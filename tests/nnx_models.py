"""Two Flax NNX networks written the way their authors write them, small, for the growth tests.

* `ResNet`: as jax-ml/bonsai's ``bonsai/models/resnet/modeling.py``: a stem,
  stages ``layer0, layer1, ...`` (`BlockGroup`) that keep their bottleneck
  blocks in ``self.blocks = nnx.List()``, the first block of a stage with a
  ``downsample`` module; batch norm built with ``use_running_average=True``
  (``model.train()`` switches it to batch statistics). Widths are tiny.
* `Transformer`: a pre-norm decoder whose blocks sit in one
  ``self.blocks = nnx.List([...])``, as flax's NNX examples and nanodo write
  one: ``x + attention(norm1(x))``, then ``x + mlp(norm2(x))``. With
  ``residual_scale`` it multiplies both branches by that number (an
  explicit step size h).
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx

RESNET_RESIDUAL_OUTPUT = ("bn2/scale", "bn2/bias")
TRANSFORMER_RESIDUAL_OUTPUT = (
    "attention/out/kernel",
    "attention/out/bias",
    "mlp/fc2/kernel",
    "mlp/fc2/bias",
)
IMAGE_SHAPE = (8, 8, 3)
VOCAB_SIZE = 11
SEQUENCE_LENGTH = 6


@dataclasses.dataclass(frozen=True)
class ModelCfg:
    block_layers: tuple[int, ...]
    num_classes: int = 3
    width: int = 2  # bonsai: 64


class Bottleneck(nnx.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        downsample=None,
        *,
        rngs: nnx.Rngs,
    ):
        self.conv0 = nnx.Conv(
            in_channels,
            out_channels,
            kernel_size=(1, 1),
            strides=1,
            padding=0,
            use_bias=False,
            rngs=rngs,
        )
        self.bn0 = nnx.BatchNorm(out_channels, use_running_average=True, rngs=rngs)
        self.conv1 = nnx.Conv(
            out_channels,
            out_channels,
            kernel_size=(3, 3),
            strides=stride,
            padding=1,
            use_bias=False,
            rngs=rngs,
        )
        self.bn1 = nnx.BatchNorm(out_channels, use_running_average=True, rngs=rngs)
        self.conv2 = nnx.Conv(
            out_channels,
            out_channels * 4,
            kernel_size=(1, 1),
            strides=1,
            padding=0,
            use_bias=False,
            rngs=rngs,
        )
        self.bn2 = nnx.BatchNorm(out_channels * 4, use_running_average=True, rngs=rngs)
        self.downsample = downsample

    def __call__(self, x):
        identity = x
        x = nnx.relu(self.bn0(self.conv0(x)))
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        if self.downsample is not None:
            identity = self.downsample(identity)
        return nnx.relu(x + identity)


class Downsample(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            kernel_size=(1, 1),
            strides=stride,
            padding=0,
            use_bias=False,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(out_channels, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.conv(x))


class BlockGroup(nnx.Module):
    def __init__(
        self, in_channels: int, out_channels: int, blocks: int, stride: int, *, rngs: nnx.Rngs
    ):
        self.blocks = nnx.List()
        downsample = None
        if stride != 1 or in_channels != out_channels * 4:
            downsample = Downsample(in_channels, out_channels * 4, stride, rngs=rngs)
        self.blocks.append(Bottleneck(in_channels, out_channels, stride, downsample, rngs=rngs))
        for _ in range(1, blocks):
            self.blocks.append(
                Bottleneck(out_channels * 4, out_channels, stride=1, downsample=None, rngs=rngs)
            )

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Stem(nnx.Module):
    def __init__(self, out_channels: int, *, rngs: nnx.Rngs):  # bonsai: 7x7/2 conv, max pool
        self.conv = nnx.Conv(
            3, out_channels, kernel_size=(3, 3), strides=1, padding=1, use_bias=False, rngs=rngs
        )
        self.bn = nnx.BatchNorm(out_channels, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


class ResNet(nnx.Module):
    """Two stages (bonsai's has four: ``layer0`` .. ``layer3``)."""

    def __init__(self, cfg: ModelCfg, *, rngs: nnx.Rngs):
        w = cfg.width
        self.stem = Stem(w, rngs=rngs)
        self.layer0 = BlockGroup(w, w, cfg.block_layers[0], stride=1, rngs=rngs)
        self.layer1 = BlockGroup(4 * w, 2 * w, cfg.block_layers[1], stride=2, rngs=rngs)
        self.pool = lambda x: x.mean(axis=(1, 2))
        self.fc = nnx.Linear(8 * w, cfg.num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        x = self.layer0(x)
        x = self.layer1(x)
        x = self.pool(x)
        return self.fc(x)


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x)))


class Block(nnx.Module):
    def __init__(self, dim: int, num_heads: int, residual_scale: float = 1.0, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=num_heads, in_features=dim, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = MLP(dim, 4 * dim, rngs=rngs)
        self.residual_scale = residual_scale

    def __call__(self, x, mask):
        x = x + self.residual_scale * self.attention(self.norm1(x), mask=mask)
        return x + self.residual_scale * self.mlp(self.norm2(x))


class Transformer(nnx.Module):
    def __init__(
        self,
        num_blocks: int,
        dim: int = 8,
        num_heads: int = 2,
        residual_scale: float = 1.0,
        *,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(VOCAB_SIZE, dim, rngs=rngs)
        self.position = nnx.Embed(SEQUENCE_LENGTH, dim, rngs=rngs)
        self.blocks = nnx.List(
            [Block(dim, num_heads, residual_scale, rngs=rngs) for _ in range(num_blocks)]
        )
        self.final_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, VOCAB_SIZE, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[-1]))
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.final_norm(x))
