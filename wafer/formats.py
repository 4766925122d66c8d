"""Number formats the wafer stores: IEEE float16, bfloat16 and Cerebras's cb16, as rounding of float32 values.

The wafer's FMAC instructions read 16-bit operands and accumulate in float32 [SDK SIMD appendix]. Values on a
16-bit grid are kept as float32 here (`round_to`, exact: products of two 16-bit values fit float32), and cb16's
16-bit encodings (`encode_cb16`, `decode_cb16`) are what SRAM holds of it.

cb16 (cbfloat16: 1 sign bit, 6 exponent bits, 9 mantissa bits [Cerebras documentation of cbfloat16]); the
exponent bias 31, subnormals and the rounding mode are not published, so they are our IEEE-like choices:
  - normal (biased exponent e in 1..62): (-1)^s * (1 + m / 2**9) * 2**(e - 31);
  - subnormal (e = 0): (-1)^s * (m / 2**9) * 2**-30, gradual underflow down to 2**-39; signed zeros;
  - e = 63: infinity (m = 0) or NaN (m != 0; NaNs are encoded as quiet NaN 0x7f00 | sign);
  - rounding to nearest, ties to even; magnitudes at or beyond CB16_MAX + half an ulp overflow to infinity.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# cb16: 1 sign bit, 6 exponent bits (bias 31), 9 mantissa bits.
CB16_EXPONENT_BITS = 6
CB16_MANTISSA_BITS = 9
CB16_BIAS = 31
CB16_MAX = (2.0 - 2.0**-9) * 2.0**31
CB16_MIN_NORMAL = 2.0**-30
CB16_MIN_SUBNORMAL = 2.0**-39

_F32_MANT = 23
_DROP = _F32_MANT - CB16_MANTISSA_BITS  # 14 float32 mantissa bits dropped
_MIN_NORMAL_BITS = (127 - 30) << _F32_MANT  # float32 bits of 2**-30


def _u32(v) -> jax.Array:
    return jnp.uint32(v)


# (exponent bits, mantissa bits, log2 of the smallest normal) of the 16-bit formats
FORMATS = {"float16": (5, 10, -14), "bfloat16": (8, 7, -126), "cb16": (CB16_EXPONENT_BITS, CB16_MANTISSA_BITS, -30)}


@functools.partial(jax.jit, static_argnums=1)
def _round_raw(x: jax.Array, storage: str) -> jax.Array:
    """float32 -> float32 on the grid of `storage`: round to nearest, ties to even, IEEE subnormals, overflow to
    infinity, NaN kept.

    `lax.reduce_precision` rounds the mantissa and the exponent range; XLA keeps it where it may drop a
    float32 -> bfloat16 -> float32 pair of casts as "excess precision" (its GPU backend does). It flushes what falls
    below the smallest normal to zero, so that range is rounded here on the subnormal grid (multiples of
    2**(min_exp - mantissa_bits)): scaling by powers of two is exact there, and lax.round rounds ties to even.
    For float16 and bfloat16 the result is bit for bit `x.astype(fmt).astype(float32)`.
    """
    e, m, min_exp = FORMATS[storage]
    r = lax.reduce_precision(x, exponent_bits=e, mantissa_bits=m)
    if e < 8:  # bfloat16's subnormals are float32's own
        scale = np.float32(2.0 ** (m - min_exp))
        sub = lax.round(x * scale, lax.RoundingMethod.TO_NEAREST_EVEN) * np.float32(1 / scale)
        r = jnp.where(jnp.abs(x) < np.float32(2.0**min_exp), sub, r)
    return r


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _round(x, storage):
    return _round_raw(x, storage)


def _round_fwd(x, storage):
    return _round_raw(x, storage), None


def _round_bwd(storage, _, ct):
    # as a cast's cotangent (`astype` round trips): the backward pass stores the gradient in the same format
    return (_round_raw(ct, storage),)


_round.defvjp(_round_fwd, _round_bwd)


def round_to(x, storage: str) -> jax.Array:
    """Round to the nearest value of a 16-bit format ("float16", "bfloat16", "cb16"); float32 results.

    Gradient: the cotangent rounded the same way (what `x.astype(bfloat16).astype(float32)` gives). Works under
    jit, grad and vmap; not under forward-mode jvp.
    """
    if storage not in FORMATS:
        raise ValueError(f"round_to: storage must be one of {tuple(FORMATS)}, got {storage!r}")
    return _round(jnp.asarray(x, jnp.float32), storage)


def round_cb16(x) -> jax.Array:
    """Round to the nearest cb16 value (ties to even); returns float32 values on the cb16 grid.

    Gradient: the cotangent rounded to cb16 (as `astype` round trips do for float16/bfloat16). Works under
    jit, grad and vmap; not under forward-mode jvp.
    """
    return round_to(x, "cb16")


@jax.jit
def encode_cb16(x) -> jax.Array:
    """float32 -> the uint16 bit patterns of the nearest cb16 values (sign | exponent << 9 | mantissa)."""
    r = _round_raw(jnp.asarray(x, jnp.float32), "cb16")
    bits = lax.bitcast_convert_type(r, jnp.uint32)
    sign = (bits >> 16) & _u32(0x8000)
    mag = bits & _u32(0x7FFFFFFF)
    exp = mag >> _F32_MANT
    normal = ((exp - _u32(127 - CB16_BIAS)) << CB16_MANTISSA_BITS) | ((mag >> _DROP) & _u32(0x1FF))
    a = lax.bitcast_convert_type(mag, jnp.float32)
    sub = (a * np.float32(2.0**39)).astype(jnp.uint32)  # exact: r is on the subnormal grid
    body = jnp.where(mag < _u32(_MIN_NORMAL_BITS), sub, normal)
    body = jnp.where(mag == _u32(0x7F800000), _u32(0x7E00), body)
    body = jnp.where(jnp.isnan(r), _u32(0x7F00), body)
    return (sign | body).astype(jnp.uint16)


@jax.jit
def decode_cb16(bits) -> jax.Array:
    """uint16 cb16 bit patterns -> their float32 values."""
    b = jnp.asarray(bits).astype(jnp.uint32)
    sign = (b & _u32(0x8000)) << 16
    exp = (b >> CB16_MANTISSA_BITS) & _u32(0x3F)
    man = b & _u32(0x1FF)
    normal = ((exp + _u32(127 - CB16_BIAS)) << _F32_MANT) | (man << _DROP)
    sub = lax.bitcast_convert_type(man.astype(jnp.float32) * np.float32(2.0**-39), jnp.uint32)
    special = jnp.where(man == 0, _u32(0x7F800000), _u32(0x7FC00000))
    mag = jnp.where(exp == 0, sub, jnp.where(exp == 63, special, normal))
    return lax.bitcast_convert_type(sign | mag, jnp.float32)


def cb16_values() -> np.ndarray:
    """The float32 values of all 65,536 cb16 bit patterns, indexed by pattern (NaNs included)."""
    return np.asarray(decode_cb16(jnp.arange(1 << 16, dtype=jnp.uint32).astype(jnp.uint16)))
