"""Type stubs for `vramkit._core`, the Rust extension (pyo3 + rust-numpy).

Conventions shared by every function:
- Arrays must be C-contiguous (a ValueError says so otherwise); 0-d arrays count as one element.
- numpy has no bfloat16: **bf16 is passed and returned as uint16 arrays holding its bits**
  (`t.view(torch.uint16).numpy()`, `torch.from_numpy(a).view(torch.bfloat16)`). A uint16 input array is
  always read as bfloat16.
- FP8 codes are uint8 arrays of float8 bit patterns (`torch.from_numpy(a).view(torch.float8_e4m3fn)`).
- Outputs are new arrays (huge-page backed when large) unless an `out=` array is passed; the GIL is released
  while the kernels run on all cores (rayon).
- Errors: ValueError for bad shapes, sizes (negative ones included), names and NaN/Inf where a scale is
  needed; TypeError for arrays of a dtype that is not accepted; MemoryError when an output or working buffer
  cannot be allocated. Input is validated before any kernel runs, so bad input never reaches a Rust panic.
- Int arguments of the attention functions (sizes, block sizes, budgets) accept Python and numpy integers
  (not bool: TypeError); one out of its range (negative, 0 where a positive size is needed, or above
  2**64 - 1) is a ValueError naming the argument and the accepted range, not an OverflowError.
"""

import os
from collections.abc import Callable, Sequence
from types import ModuleType
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
    """The vector instruction set the kernels use on this CPU: "avx512", "avx2+fma+f16c" or "portable"
    (the environment variable VRAMKIT_SIMD=portable|avx2|avx512, read once, caps it)."""

def fp8_cast(x: FloatArray, fmt: Literal["fp8_e4m3fn", "fp8_e5m2"],
             out: npt.NDArray[np.uint8] | None = None, *,
             overflow: Literal["nan", "inf", "saturate"] | None = None,
             inf: Literal["nan", "inf", "saturate"] | None = None) -> npt.NDArray[np.uint8]:
    """Unscaled cast to FP8 codes, bit for bit as `torch.Tensor.to(torch.float8_*)` under an overflow rule:
    round to nearest even (subnormals included), NaN stays NaN (0x7f with its sign); a finite value beyond
    the range (|x| > 464 for e4m3fn, |x| >= 61440 for e5m2) becomes `overflow` and ±inf becomes `inf`, each
    "nan" (0x7f), "inf" (0x7c, e5m2 only) or "saturate" (±448 = 0x7e, ±57344 = 0x7b), with the input's sign.
    Omitted: c10's unsaturated cast (torch 2.11's CPU cast), "nan" for e4m3fn and "inf" for e5m2; torch 2.15
    saturates e4m3fn (`vramkit.quant.CAST_RULES` holds the installed torch's rule). Shape of `x`."""

def quantize(x: FloatArray, fmt: Format, block_len: int, out: CodeArray | None = None,
             scales_out: npt.NDArray[np.float32] | None = None
             ) -> tuple[CodeArray, npt.NDArray[np.float32]]:
    """Scaled quantization with one float32 scale per block of `block_len` consecutive elements (row-major):
    `scale = amax(|block|) / fmt_max` (448, 57344, 127), codes
    `cast(clamp(x / scale, -fmt_max, fmt_max))` for fp8 and `clamp(round_half_even(x / scale), -127, 127)`
    for int8; a block whose scale would be 0 (all zeros, or an amax that small) gets scale 1.
    Returns (codes shaped like `x`: uint8 for fp8, int8 for int8; scales of shape [n / block_len]).
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

# --- attention (rust_src/core/src/attention, rust_src/core/src/plan/attention.rs) -----------------------------

AttentionEngine = Literal["portable", "avx512", "avx512-bf16"]
MaskArray = npt.NDArray[np.bool_] | FloatArray
"""bool (True = attend; read as bytes, so any nonzero byte counts as True, as in numpy and torch) or additive
float32 / float16 / uint16 holding bfloat16 bits."""

class AttentionStats(TypedDict):
    engine: AttentionEngine
    block_q: int
    block_kv: int
    heads_per_group: int
    threads: int
    peak_scratch_bytes: int
    """Working memory the kernel held at most at once, counted allocation by allocation (output excluded)."""
    predicted_scratch_bytes: int
    """What the planner's model gives for this call; never below `peak_scratch_bytes`."""

class AttentionPlan(TypedDict):
    budget_bytes: int
    """The budget planned for, as given (0 = no limit)."""
    block_q: int
    block_kv: int
    heads_per_group: int
    threads: int
    torch_threads: int
    engine: AttentionEngine | None
    kernel_peak_bytes: int
    """Rust kernel: threads x per-thread blocks + packed K/V of `heads_per_group` heads."""
    kernel_per_thread_bytes: int
    kernel_packed_kv_bytes: int
    kernel_fits: bool
    chunk_q: int
    chunk_kv: int
    torch_peak_bytes: int
    """torch chunked path (`vramkit.attention_torch.chunked`) with these chunks."""
    torch_fits: bool
    slice: int
    sliced_peak_bytes: int
    """Attention slicing, `slice` (batch * head) pairs at a time."""
    sliced_fits: bool
    scores_bytes: int
    """The whole (B, H, Nq, Nk) score matrix in the input dtype, for comparison."""
    summary: str

def attention(q: FloatArray, k: FloatArray, v: FloatArray, heads: int | None = None,
              mask: MaskArray | None = None, scale: float | None = None, *, block_q: int | None = None,
              block_kv: int | None = None, heads_per_group: int | None = None,
              engine: Literal["auto", "portable", "avx512", "avx512-bf16"] = "auto"
              ) -> tuple[FloatArray, AttentionStats]:
    """Flash-style attention `softmax(scale * q k^T + mask) v` on the CPU (rayon, GIL released), memory
    O(blocks) instead of O(Nq * Nk). q, k, v share one dtype; they are (B, H, N, D) when `heads` is None,
    else (B, N, heads * D) (v may have another head dim than q and k). The output has q's layout and
    dtype. `mask` is 4-D (B|1, H|1, Nq|1, Nk|1). `scale` defaults to 1/sqrt(D). All arithmetic is float32
    (on "avx512-bf16", bf16 products are exact and summed in float32; probabilities are rounded to bf16 for
    P V). A query whose keys are all masked out (bool False or additive -inf), or any query when Nk == 0,
    gets zeros; finite additive values, however large (e.g. float32's min), stay finite logits. NaN inputs
    reach the outputs they touch. Unset block sizes are the planner's with no memory limit
    (`vramkit.attention` passes the blocks it planned under its budget). Returns (output, stats)."""

def attention_engines() -> list[AttentionEngine]:
    """The engines this CPU runs ("portable" always; "avx512" needs AVX-512F; "avx512-bf16" AVX-512 BF16)."""

def attention_engine(dtype: Literal["float32", "float16", "bfloat16"]) -> AttentionEngine:
    """The engine `attention(..., engine="auto")` runs for inputs of `dtype` on this CPU: "avx512-bf16" for
    bfloat16 where the CPU has AVX-512 BF16, "avx512" where it has AVX-512F, else "portable" (`VRAMKIT_SIMD`
    below avx512 leaves only "portable"). ValueError for other names, TypeError for a non-str."""

def plan_attention(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, dtype_bytes: int,
                   budget_bytes: int, *, v_head_dim: int | None = None, threads: int | None = None,
                   torch_threads: int | None = None, engine: AttentionEngine | None = None) -> AttentionPlan:
    """Block and chunk sizes for every attention mode under `budget_bytes` of extra memory, with each mode's
    predicted peak extra bytes (upper bounds of the measured ones) and whether it fits. This low-level
    planner knows no device: 0 here means no limit. (`vramkit.attention` never asks it for "no limit" on
    CPU or CUDA: its `budget_bytes=None` or 0 is the memory free on the device, passed here in bytes.)
    `threads` defaults to the rayon pool's size; `torch_threads` (torch's CPU threads, 0 for GPUs) is
    recorded in the plan but changes no prediction (the torch paths' measured peaks did not depend on it);
    `engine` None plans for the most demanding engine."""

# --- offload planner (rust_src/core/src/plan/offload.rs) ----------------------------------------------------

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

# --- safetensors files (rust_src/core/src/io, rust_src/py/src/io.rs) -----------------------------------------

class SafetensorsTensor(TypedDict):
    name: str
    dtype: str
    """safetensors dtype name: "F32", "BF16", "F8_E4M3", "I8", "U8", ..."""
    shape: list[int]
    start: int
    """Byte range inside the data area (after the header)."""
    end: int

class SafetensorsHeader(TypedDict):
    path: str
    file_size: int
    header_len: int
    header: bytes
    """The JSON header bytes (padding included)."""
    metadata: dict[str, str] | None
    tensors: list[SafetensorsTensor]
    """In the order their data lies in the file."""
    markers: dict[str, bytes]
    """The bytes of every small uint8 `<layer>.comfy_quant` tensor (UTF-8 JSON)."""

class QuantizedLayer(TypedDict):
    tensor: str
    dtype: str
    shape: list[int]
    granularity: Literal["tensor", "channel", "group"]
    group_size: int | None
    rotate: int | None
    marker: str
    """The marker JSON written for the layer."""
    native: bool
    """The marker is one of ComfyUI's own formats."""
    bytes_before: int
    bytes_after: int
    """Codes + scales + marker."""
    max_abs: float
    rmse: float
    snr_db: float

class QuantizeFileReport(TypedDict):
    path: str
    input_bytes: int
    output_bytes: int
    tensors: int
    seconds: float
    layers: list[QuantizedLayer]

LayerSpec = tuple[str, Literal["tensor", "channel", "group"], int | None, int | None]
"""(tensor name `<layer>.weight`, granularity, group_size (group only) or None, ConvRot group size or None)."""
ProgressCallback = Callable[[int, int, int, int, str], object]
"""Called after each chunk with (tensors_done, tensors_total, bytes_done, bytes_total, tensor_name); an
exception it raises cancels the run and is re-raised (Ctrl-C cancels too)."""

def safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Opens and validates a safetensors file (memory-mapped; the header read by the `safetensors` crate)
    without reading tensor data. ValueError names what is wrong with a bad file (truncated, a header that
    lies about sizes or offsets, overlapping tensors, an unknown dtype, ...); OSError when it cannot be read."""

def quantize_safetensors(src: str | os.PathLike[str], dst: str | os.PathLike[str], fmt: Format,
                         layers: Sequence[LayerSpec], metadata: dict[str, str] | None = None,
                         overwrite: bool = False, progress: ProgressCallback | None = None
                         ) -> QuantizeFileReport:
    """Streams `src` into a new safetensors file `dst` with `layers` quantized (codes, `.weight_scale`,
    `.comfy_quant` marker; see `vramkit.io.formats`) and every other tensor copied byte for byte; `metadata`
    entries join the input's `__metadata__`. Writes a temporary file in dst's folder, fsyncs and renames it;
    on any error it is removed and no output exists. The GIL is released; memory stays near one chunk.
    ValueError: bad options, a bad input file, NaN/Inf in a weight, dst == src. OSError (with its errno):
    FileExistsError when dst exists and not `overwrite`, ENOSPC/EFBIG when the disk or file size limit is
    reached, ... ."""

def quantize_tensors(tensors: Sequence[tuple[str, str, Sequence[int], npt.NDArray[np.uint8]]],
                     dst: str | os.PathLike[str], fmt: Format, layers: Sequence[LayerSpec],
                     metadata: dict[str, str] | None = None, overwrite: bool = False,
                     progress: ProgressCallback | None = None) -> QuantizeFileReport:
    """`quantize_safetensors` from tensors in memory: (name, safetensors dtype, shape, C-contiguous uint8
    array of the little-endian bytes) each; `metadata` becomes the `__metadata__`."""

class _BenchModule(ModuleType):
    """`_core._bench`: helpers for `vramkit bench` only (not part of the API)."""

    @staticmethod
    def copy_bytes(x: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
        """The bytes of `x` copied into a new array allocated like every kernel output (a bandwidth
        roofline)."""

_bench: _BenchModule

# ---- fit planner (vramkit.plan) -----------------------------------------------------------------------

StorageFormat = Literal["fp32", "bf16", "fp16", "fp8", "int8"]

class FormatBytes(TypedDict, total=False):
    fp32: int
    bf16: int
    fp16: int
    fp8: int
    int8: int

class ProfileBlock(TypedDict):
    name: str
    bytes: FormatBytes
    """Required: bf16, fp8, int8 (8-bit with scales); fp16 defaults to bf16, fp32 to twice bf16."""
    largest_layer_params: int

class ProfileComponent(TypedDict):
    name: str
    bytes: int

class ModelProfile(TypedDict, total=False):
    name: str
    description: str
    weights_format: StorageFormat
    blocks: list[ProfileBlock]
    text_encoders: list[ProfileComponent]
    vae: ProfileComponent | None
    family: Literal["unet", "dit"]
    memory_usage_factor: float
    latent_channels: int
    latent_spatial: int
    latent_temporal: int
    patch: int
    joint_text_tokens: int
    hidden: int
    widest: int
    activation_factor: float
    heads: int
    attention_layers: int
    flops_per_token: float
    cfg: bool
    vae_decode_bytes_per_pixel: int
    vae_decode_frames: int
    comfy_vae_decode_per_latent: int

class DeviceProfile(TypedDict, total=False):
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int] | None
    bf16: bool
    fp8_matmul: bool
    int8_matmul: bool
    efficient_attention: bool
    h2d_gbps: float
    memory_gbps: float
    tflops: float
    ram_bytes: int
    os: Literal["linux", "windows", "macos"]
    memory_manager: Literal["dynamic", "legacy"]
    streams: int
    extra_reserved_bytes: int | None
    minimum_inference_bytes: int | None

class JobSpec(TypedDict, total=False):
    width: int
    height: int
    frames: int
    batch: int
    cfg: bool | None
    estimate: Literal["first_principles", "comfy"]
    activation_scale: float
    time_scale: float

class PlanStep(TypedDict):
    rung: str
    action: str
    reason: str

class FitPlan(TypedDict):
    fits: bool
    steps: list[PlanStep]
    predicted_peak_bytes: int
    predicted_step_seconds: float
    components: dict[str, int]
    config: dict[str, object]
    activations: dict[str, object]
    phases: dict[str, int]
    time: dict[str, float]
    preset: str
    budget_bytes: int
    requested_budget_bytes: int
    min_budget_bytes: int
    ram_needed_bytes: int
    notes: list[str]
    suggestions: list[str]
    model: str
    device: str

def plan_fit(model_profile: ModelProfile | dict[str, object], device: DeviceProfile | dict[str, object],
             job: JobSpec | dict[str, object], budget_bytes: int,
             preset: Literal["auto", "gpu-only", "medvram", "lowvram", "novram"] = "auto") -> FitPlan:
    """The ladder searched for the plan with the lowest predicted step time whose predicted peak fits
    `budget_bytes` (0 = the device's free memory; capped at the device's dedicated memory: the Windows
    shared-memory fallback never counts). Required: model_profile name, blocks, family,
    memory_usage_factor, latent_channels, latent_spatial, patch, hidden, widest, heads, attention_layers;
    device total_bytes; job width, height. ValueError naming the field for anything missing, unknown or out
    of range. `predicted_peak_bytes` is the sampling peak, the sum of `components` (weights,
    streaming_buffers, activations, attention, text_encoder, vae, reserve). The GIL is released."""

def builtin_profiles() -> dict[str, ModelProfile]:
    """The built-in model profiles (sd1.5, sdxl, flux-dev, flux2-dev, qwen-image, wan2.1-14b, wan2.2-5b,
    wan2.1-1.3b, hunyuanvideo) in the layout `plan_fit` takes, keyed by name."""
