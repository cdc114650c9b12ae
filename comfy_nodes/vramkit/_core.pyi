"""Type stubs for `vramkit._core`, the Rust extension (pyo3 + rust-numpy).

Conventions shared by every function:
- Arrays must be C-contiguous (a ValueError says so otherwise); 0-d arrays count as one element.
- numpy has no bfloat16: **bf16 is passed and returned as uint16 arrays holding its bits**
  (`t.view(torch.uint16).numpy()`, `torch.from_numpy(a).view(torch.bfloat16)`). A uint16 input array is
  always read as bfloat16.
- FP8 codes are uint8 arrays of float8 bit patterns (`torch.from_numpy(a).view(torch.float8_e4m3fn)`).
- Outputs are new arrays (huge-page backed when large) unless an `out=` array is passed; the GIL is released
  while the kernels run on all cores (rayon).
- Errors: ValueError for bad shapes, sizes, names and NaN/Inf where a scale is needed; TypeError for arrays of
  a dtype that is not accepted. No Rust panic reaches Python.
"""

from collections.abc import Sequence
from typing import Literal, TypedDict

import numpy as np
import numpy.typing as npt

__version__: str

FloatArray = npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16]
"""float32, float16, or uint16 holding bfloat16 bits."""
CodeArray = npt.NDArray[np.uint8] | npt.NDArray[np.int8]
Format = Literal["fp8_e4m3fn", "fp8_e5m2", "int8"]

class ErrorStats(TypedDict):
    max_abs: float
    rmse: float
    snr_db: float

def simd_level() -> str:
    """The vector instruction set the kernels use on this CPU ("avx2+fma+f16c" or "portable")."""

def copy_bytes(x: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """The bytes of `x` copied into a new array allocated like every kernel output (a bandwidth roofline)."""

def fp8_cast(x: FloatArray, fmt: Literal["fp8_e4m3fn", "fp8_e5m2"],
             out: npt.NDArray[np.uint8] | None = None) -> npt.NDArray[np.uint8]:
    """Unscaled cast to FP8 codes, bit for bit as `torch.Tensor.to(torch.float8_*)`: round to nearest even,
    NaN/inf kept, overflow gives NaN (e4m3fn) or inf (e5m2), never saturation. Shape of `x`."""

def quantize(x: FloatArray, fmt: Format, block_len: int, out: CodeArray | None = None,
             scales_out: npt.NDArray[np.float32] | None = None
             ) -> tuple[CodeArray, npt.NDArray[np.float32]]:
    """Scaled quantization with one float32 scale per block of `block_len` consecutive elements (row-major):
    `scale = amax(|block|) / fmt_max` (448, 57344, 127; an all-zero block gets scale 1), codes
    `cast(clamp(x / scale, -fmt_max, fmt_max))` for fp8 and `clamp(round_half_even(x / scale), -127, 127)`
    for int8. Returns (codes shaped like `x`: uint8 for fp8, int8 for int8; scales of shape [n / block_len]).
    ValueError names the flat index of the first NaN/Inf."""

def dequantize(codes: CodeArray, fmt: Format, scales: npt.NDArray[np.float32] | None, block_len: int,
               out_dtype: Literal["float32", "float16", "bfloat16"],
               out: npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16] | None = None
               ) -> npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16]:
    """`decode(code) * scale` in float32, rounded to `out_dtype` as torch does (bfloat16 returned as uint16
    bits). `scales=None` (fp8 only) decodes without a scale. Shape of `codes`."""

def error_stats(x: FloatArray, codes: CodeArray, fmt: Format, scales: npt.NDArray[np.float32] | None,
                block_len: int) -> ErrorStats:
    """Error of the dequantized codes (float32) against `x`, in one pass accumulated in float64:
    max |err|, root mean square error, and SNR in dB (`10 log10(sum x^2 / sum err^2)`, inf when exact)."""

class OffloadPlan(TypedDict):
    resident: list[bool]
    resident_bytes: int
    streamed_bytes: int
    streamed_layers: int
    unplaced_layers: int
    buffer_bytes: int
    full_load: bool

def plan_offload(bytes: Sequence[int], cast_bytes: Sequence[int], streamable: Sequence[bool], budget: int,
                 model_bytes: int, streams: int, rule: Literal["next_layers", "multiply"]) -> OffloadPlan:
    """Which layers ComfyUI's legacy loader keeps resident for `budget` bytes (a port of its greedy walk in
    `ModelPatcher.load`): layers in name order, their weight bytes, the bytes to run them streamed, whether
    they can stream; `streams` is ComfyUI's NUM_STREAMS, `rule` its buffer sizing ("next_layers" since 0.29,
    "multiply" in 0.3.7x). A budget above `model_bytes` loads everything."""
