"""Gradient codecs for ``--comm_compress``: BF16, and INT8 blocks with a shared exponent (DLCP).

A codec turns a float32 gradient buffer into a byte payload that every rank gathers, then each rank
decodes all payloads and sums them in float32, in rank order, so every rank gets the same sum.

- BF16: the top 16 bits of each float32, rounded to nearest even (2 bytes per value). The
  ``minicaffe.kernels.bf16`` kernels convert when they are built; the NumPy code below otherwise.
- INT8 (Intel's DLCP, SPECS §5.5): blocks of 256 values share one exponent ``scale = 7 - ceil(log2
  max|x|)`` (an all-zero block gets 0); each value is sent as ``q = sat_int8(rint(x * 2**scale))``,
  1 byte, plus 1 byte of scale per block. What rounding loses (``x - q * 2**-scale``) is kept by the
  sender and added to the next iteration's gradient (error feedback), so nothing is lost for good.
"""
import numpy as np

BLOCK = 256

try:
    from ..kernels import bf16 as _bf16_kernels
except ImportError:  # not built yet: the NumPy conversion below is exact too
    _bf16_kernels = None


def fp32_to_bf16(x, out):
    """Rounds float32 ``x`` to bfloat16 bit patterns (uint16) in ``out``, nearest even; NaN stays NaN."""
    if _bf16_kernels is not None:
        _bf16_kernels.fp32_to_bf16(x, out)
        return out
    bits = x.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    out[...] = rounded
    nan = np.isnan(x)
    if nan.any():
        out[nan] = (bits[nan] >> 16) | 0x0040
    return out


def bf16_to_fp32(h, out):
    if _bf16_kernels is not None:
        _bf16_kernels.bf16_to_fp32(h, out)
        return out
    out.view(np.uint32)[...] = h.astype(np.uint32) << 16
    return out


def block_scales(blocks):
    """Each block's exponent: 7 - ceil(log2 max|x|), 0 for an all-zero block, clamped to int8."""
    peak = np.abs(blocks).max(axis=1)
    mantissa, exponent = np.frexp(peak)
    ceil_log2 = exponent - (mantissa == 0.5)
    scales = np.where(peak > 0, 7 - ceil_log2, 0)
    return np.clip(scales, -127, 127).astype(np.int8)


class BF16Codec:
    name = "bf16"

    def payload_bytes(self, count):
        return 2 * count

    def encode(self, values, payload):
        fp32_to_bf16(values, payload.view(np.uint16))

    def add_decoded(self, payload, out, scratch):
        np.add(out, bf16_to_fp32(payload.view(np.uint16), scratch), out=out)


class Int8BlockCodec:
    """INT8 blocks of 256 with a per-block exponent; ``encode`` applies and updates the error feedback."""

    name = "int8"

    def __init__(self, count):
        self.count = count
        self.blocks = -(-count // BLOCK)
        self.residual = np.zeros(count, np.float32)
        self._padded = np.zeros(self.blocks * BLOCK, np.float32)

    def payload_bytes(self, count):
        return self.blocks * (BLOCK + 1)

    def encode(self, values, payload):
        n = self.count
        padded = self._padded
        np.add(values, self.residual, out=padded[:n])
        blocks = padded.reshape(self.blocks, BLOCK)
        scales = block_scales(blocks)
        q = np.clip(np.rint(np.ldexp(blocks, scales[:, None])), -128, 127)
        payload[: self.blocks * BLOCK].view(np.int8)[...] = q.ravel()
        payload[self.blocks * BLOCK:].view(np.int8)[...] = scales
        np.subtract(padded[:n], np.ldexp(q, -scales[:, None].astype(np.int32)).ravel()[:n], out=self.residual)

    def add_decoded(self, payload, out, scratch):
        q = payload[: self.blocks * BLOCK].view(np.int8).reshape(self.blocks, BLOCK)
        scales = payload[self.blocks * BLOCK:].view(np.int8).astype(np.int32)
        decoded = np.ldexp(q.astype(np.float32), -scales[:, None]).ravel()
        np.add(out, decoded[: self.count], out=out)


def make_codec(name, count):
    if name in (None, "", "none"):
        return None
    if name == "bf16":
        return BF16Codec()
    if name == "int8":
        return Int8BlockCodec(count)
    raise ValueError(f"unknown gradient compression '{name}' (none, bf16 or int8)")
