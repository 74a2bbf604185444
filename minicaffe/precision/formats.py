"""The reduced-precision number formats as the layers use them: turn an FP32 tensor into a GEMM
operand (``encode``) and multiply two operands into an FP32 result (``gemm``).

* DFP16: int16 values with one shared exponent per tensor (x ≈ q · 2^e, 2 bits of headroom), an
  INT16 GEMM accumulating at most ``k_chunk`` products in INT32 before spilling to FP32, scaled by
  2^(e_a + e_b).
* BF16: the bf16 bits (uint16, rounded to nearest even) and a bf16 GEMM accumulating in FP32.
* BF16 emulated: FP32 values rounded to bf16-representable ones and the FP32 GEMM, the reference
  the native path is compared with.

Every operand lives in a grow-only buffer of the layer, so a training step allocates nothing. The
kernel modules are imported when a format is first made, so FP32 nets never load them.
"""
import numpy as np

from .. import rng
from ..errors import NumericalError
from ..kernels.blas import matmul
from .policy import BF16, DFP16


class Buffers:
    """Grow-only scratch arrays, one per key: a view of the requested shape, reallocated only to grow."""

    def __init__(self):
        self._flat = {}

    def get(self, key, shape, dtype):
        size = int(np.prod(shape))
        flat = self._flat.get(key)
        if flat is None or flat.dtype != dtype or flat.size < size:
            flat = self._flat[key] = np.empty(max(size, 1), dtype)
        return flat[:size].reshape(shape)


class Dfp16Format:
    storage = np.int16

    def __init__(self, layer, setting, stats):
        self.layer = layer
        self.headroom = setting.options.headroom
        self.stochastic = setting.options.stochastic_rounding
        self.debug_overflow = setting.options.debug_overflow
        self.stats = stats
        # Drawn at the first encode, not here: a layer may be given its precision twice (by itself, then
        # by the net), and only the driver that runs should consume the framework's random stream.
        self._seed = None
        self._draws = 0
        from ..kernels import dfp16, lowp_gemm
        self.quantize, self.non_finite, self.gemm_s16 = dfp16.quantize, dfp16.NonFiniteError, lowp_gemm.gemm_s16

    def encode(self, x, out, role, what):
        """Quantizes ``x`` into ``out`` (int16, same shape); returns the shared exponent."""
        seed = 0
        if self.stochastic:
            if self._seed is None:
                self._seed = rng.derive_seed()
            self._draws += 1
            seed = (self._seed + self._draws) % 2**63
        try:
            result = self.quantize(x, out, headroom=self.headroom, stochastic=self.stochastic, seed=seed)
        except self.non_finite:
            raise NumericalError(f"layer '{self.layer.name}' ({self.layer.type_name}): {what} holds inf "
                                 f"or NaN, which DFP16 cannot represent") from None
        if self.stats is not None:
            self.stats.tensor(role).record(result.exponent, x.size, result.flushed, result.clipped,
                                           result.max_abs)
        return result.exponent

    def gemm(self, a, e_a, b, e_b, c, beta, trans_a, trans_b, k_chunk, gemm_pass):
        events = self.gemm_s16(a, b, c, 2.0 ** (e_a + e_b), beta=beta, trans_a=trans_a,
                                    trans_b=trans_b, k_chunk=k_chunk, debug_overflow=self.debug_overflow)
        if self.stats is not None and self.debug_overflow:
            self.stats.add_overflow(gemm_pass, events)


class Bf16Format:
    storage = np.uint16

    def __init__(self, layer, setting, stats):
        self.stats = stats
        from ..kernels import bf16, lowp_gemm
        self.to_bf16, self.gemm_bf16 = bf16.fp32_to_bf16, lowp_gemm.gemm_bf16

    def encode(self, x, out, role, what):
        self.to_bf16(x, out)
        if self.stats is not None:
            self.stats.tensor(role).record(None, x.size, 0, 0, float(np.max(np.abs(x), initial=0.0)))
        return 0

    def gemm(self, a, e_a, b, e_b, c, beta, trans_a, trans_b, k_chunk, gemm_pass):
        self.gemm_bf16(a, b, c, alpha=1.0, beta=beta, trans_a=trans_a, trans_b=trans_b)


class Bf16EmulatedFormat:
    storage = np.float32

    def __init__(self, layer, setting, stats):
        self.stats = stats
        from ..kernels import bf16
        self.round_to_bf16 = bf16.round_to_bf16

    def encode(self, x, out, role, what):
        self.round_to_bf16(x, out)
        if self.stats is not None:
            self.stats.tensor(role).record(None, x.size, 0, 0, float(np.max(np.abs(x), initial=0.0)))
        return 0

    def gemm(self, a, e_a, b, e_b, c, beta, trans_a, trans_b, k_chunk, gemm_pass):
        matmul(a, b, c, trans_a=trans_a, trans_b=trans_b, beta=beta)


def make_format(layer, setting, stats):
    if setting.mode == DFP16:
        return Dfp16Format(layer, setting, stats)
    if setting.mode == BF16:
        return (Bf16EmulatedFormat if setting.emulate_bf16 else Bf16Format)(layer, setting, stats)
    raise ValueError(f"no reduced-precision format for {setting.name}")


def check_float32(layer, array):
    """The 16-bit kernels read FP32 tensors only (a float64 net, as in gradient checks, stays FP32)."""
    if array.dtype != np.float32:
        raise layer.error(f"{layer.precision.name} needs float32 blobs, got {array.dtype}")
