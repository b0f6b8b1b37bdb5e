"""GGML block-quantized weights, read exactly and laid out for onnxruntime's MatMulNBits.

A GGUF file stores a weight [N outputs, K inputs] row by row in blocks of 32 inputs:

- Q4_1: fp16 scale d, fp16 minimum m, 32 unsigned 4-bit q (byte j holds q[j] low, q[j+16] high);
  w = d*q + m.
- Q8_0: fp16 scale d, 32 signed 8-bit q; w = d*q.

MatMulNBits computes x . (s*(q - z)) with a per-block scale s and an integer zero point z (8 for 4
bits, 128 for 8 bits when none is given). Q8_0 maps onto it exactly (q + 128, z = 128). Q4_1's
real-valued minimum does not: written as d*(q - 8) + (m + 8d), the first term is MatMulNBits with
its default zero point and the second depends on the input only through its block sums, so

    x . w = MatMulNBits(x) + blocksum(x) . c,   c = m + 8d   (one small fp32 matmul, K/32 wide)

is the block's exact value, not a requantisation. Nothing here imports onnxruntime or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32  # weights per block in both formats
Q4_1_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles
Q8_0_BYTES = 34  # fp16 d, 32 int8


@dataclass(frozen=True)
class Q4_1:
    """A weight [N, K] as Q4_1 blocks: d, m [N, K/32] float32 (exact fp16 values), q [N, K/32, 32]."""

    d: np.ndarray
    m: np.ndarray
    q: np.ndarray  # uint8 in 0..15

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * BLOCK

    def dequantize(self) -> np.ndarray:
        """The fp32 weight [N, K] the blocks stand for, as llama.cpp computes it."""
        w = self.d[..., None] * self.q.astype(np.float32) + self.m[..., None]
        return w.reshape(self.shape)

    def rows(self, index: np.ndarray) -> Q4_1:
        return Q4_1(self.d[index], self.m[index], self.q[index])


@dataclass(frozen=True)
class Q8_0:
    """A weight [N, K] as Q8_0 blocks: d [N, K/32] float32 (exact fp16 values), q [N, K/32, 32]."""

    d: np.ndarray
    q: np.ndarray  # int8

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * BLOCK

    def dequantize(self) -> np.ndarray:
        return (self.d[..., None] * self.q.astype(np.float32)).reshape(self.shape)

    def rows(self, index: np.ndarray) -> Q8_0:
        return Q8_0(self.d[index], self.q[index])


Weight = np.ndarray | Q4_1 | Q8_0  # an fp32 [N, K] array or its blocks


def parse_q4_1(raw: np.ndarray, rows: int, cols: int) -> Q4_1:
    """Blocks of a GGUF Q4_1 tensor whose raw bytes are `raw` (rows x cols weights)."""
    blocks = _blocks(raw, rows, cols, Q4_1_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]  # rows x nb x 16
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j low nibble, j + 16 high
    return Q4_1(d, m, np.ascontiguousarray(q))


def parse_q8_0(raw: np.ndarray, rows: int, cols: int) -> Q8_0:
    """Blocks of a GGUF Q8_0 tensor whose raw bytes are `raw` (rows x cols weights)."""
    blocks = _blocks(raw, rows, cols, Q8_0_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
    return Q8_0(d, q)


def _blocks(raw: np.ndarray, rows: int, cols: int, size: int) -> np.ndarray:
    if cols % BLOCK:
        raise ValueError(
            f"a block-quantized tensor needs a multiple of {BLOCK} columns, got {cols}."
        )
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    expected = rows * (cols // BLOCK) * size
    if raw.size != expected:
        raise ValueError(
            f"{rows} x {cols} weights need {expected} bytes of blocks, got {raw.size}."
        )
    return raw.reshape(rows, cols // BLOCK, size)


def quantize_q4_1(w: np.ndarray) -> Q4_1:
    """Round-to-nearest Q4_1 blocks of an fp32 weight [N, K], as llama.cpp's quantize does (lossy:
    used for `--quantize int4` and to give test models 4-bit weights)."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"Q4_1 needs a multiple of {BLOCK} inputs, got {k}.")
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    d = ((hi - lo) / 15.0).astype(np.float16).astype(np.float32)
    m = lo.astype(np.float16).astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint((blocks - m[..., None]) * inv[..., None]), 0, 15).astype(np.uint8)
    return Q4_1(d, m, q)


def quantize_q8_0(w: np.ndarray) -> Q8_0:
    """Round-to-nearest Q8_0 blocks of an fp32 weight [N, K] (lossy, as llama.cpp's)."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    d = (np.abs(blocks).max(axis=-1) / 127.0).astype(np.float16).astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint(blocks * inv[..., None]), -127, 127).astype(np.int8)
    return Q8_0(d, q)


@dataclass(frozen=True)
class NBits:
    """A weight in MatMulNBits' layout: packed [N, K/32, 32*bits/8], scales [N*K/32], and for Q4_1
    the block-sum correction [K/32, N] (c = m + 8d, transposed for x_blocksums @ c)."""

    packed: np.ndarray
    scales: np.ndarray
    bits: int
    correction: np.ndarray | None
    n: int
    k: int


def to_nbits(w: Q4_1 | Q8_0) -> NBits:
    """The MatMulNBits form of a block-quantized weight, with the same value (see module doc)."""
    n, k = w.shape
    if isinstance(w, Q4_1):
        packed = (w.q[..., 0::2] | (w.q[..., 1::2] << 4)).astype(np.uint8)  # N x nb x 16
        correction = np.ascontiguousarray((w.m + 8.0 * w.d).T, dtype=np.float32)  # nb x N
        return NBits(packed, w.d.reshape(-1).copy(), 4, correction, n, k)
    packed = (w.q.astype(np.int16) + 128).astype(np.uint8)  # N x nb x 32, zero point 128
    return NBits(packed, w.d.reshape(-1).copy(), 8, None, n, k)


def concat_rows(parts: list[Weight]) -> Weight:
    """Weights stacked along N (packed QKV, gate + up) in whichever form they share."""
    if all(isinstance(p, Q4_1) for p in parts):
        return Q4_1(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("d", "m", "q")))
    if all(isinstance(p, Q8_0) for p in parts):
        return Q8_0(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("d", "q")))
    return np.concatenate([dense(p) for p in parts])


def dense(w: Weight) -> np.ndarray:
    """The fp32 [N, K] value of any weight form."""
    return w if isinstance(w, np.ndarray) else w.dequantize()
