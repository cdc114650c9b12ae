//! What the fit planner plans with: a model profile (its blocks with their bytes at each storage format,
//! text encoders, VAE, and the few architecture numbers the activation and time estimates need), a device
//! profile (memory, capabilities, bandwidths, system RAM, OS, memory manager) and a job (size, frames,
//! batch). Pure data with validation; every field error names the field.
//!
//! Byte counts are `u64` and every sum saturates, so an absurd size never wraps into one that "fits".

use crate::error::CoreResult;
use crate::value_err;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// A storage format of weights. 8-bit formats carry their scales in the byte counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Format {
    Fp32,
    Bf16,
    Fp16,
    /// float8_e4m3fn with a per-tensor float32 scale (ComfyUI's native `float8_e4m3fn` layout).
    Fp8,
    /// int8 with a float32 scale per output row (ComfyUI's native `int8_tensorwise`, per-row).
    Int8,
}

impl Format {
    pub const ALL: [Format; 5] = [
        Format::Fp32,
        Format::Bf16,
        Format::Fp16,
        Format::Fp8,
        Format::Int8,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Fp32 => "fp32",
            Format::Bf16 => "bf16",
            Format::Fp16 => "fp16",
            Format::Fp8 => "fp8",
            Format::Int8 => "int8",
        }
    }

    pub fn parse(field: &str, name: &str) -> CoreResult<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                value_err!(
                    "{field} must be one of \"fp32\", \"bf16\", \"fp16\", \"fp8\", \"int8\"; got {name:?}"
                )
            })
    }

    /// Bytes per element of the weights themselves (scales not included).
    pub fn element_bytes(self) -> u64 {
        match self {
            Format::Fp32 => 4,
            Format::Bf16 | Format::Fp16 => 2,
            Format::Fp8 | Format::Int8 => 1,
        }
    }

    pub fn is_8bit(self) -> bool {
        matches!(self, Format::Fp8 | Format::Int8)
    }
}

/// Bytes of one block at every storage format (8-bit ones with their scales and the tensors that stay
/// 16-bit: norms, biases, convolutions where only linear layers are quantized).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FormatBytes {
    pub fp32: u64,
    pub bf16: u64,
    pub fp16: u64,
    pub fp8: u64,
    pub int8: u64,
}

impl FormatBytes {
    pub fn get(&self, f: Format) -> u64 {
        match f {
            Format::Fp32 => self.fp32,
            Format::Bf16 => self.bf16,
            Format::Fp16 => self.fp16,
            Format::Fp8 => self.fp8,
            Format::Int8 => self.int8,
        }
    }

    /// From parameter counts: `params` elements, of which `quantizable` sit in 2-D (linear) weights that
    /// 8-bit formats store as one byte each, with `tensors` per-tensor fp8 scales and `rows` per-row int8
    /// scales (float32); the rest stays 16-bit.
    pub fn from_params(params: u64, quantizable: u64, tensors: u64, rows: u64) -> Self {
        let q = quantizable.min(params);
        let rest = (params - q).saturating_mul(2);
        FormatBytes {
            fp32: params.saturating_mul(4),
            bf16: params.saturating_mul(2),
            fp16: params.saturating_mul(2),
            fp8: q
                .saturating_add(rest)
                .saturating_add(tensors.saturating_mul(4)),
            int8: q
                .saturating_add(rest)
                .saturating_add(rows.saturating_mul(4)),
        }
    }

    pub fn check(&self, field: &str) -> CoreResult<()> {
        if self.fp8 > self.bf16 || self.int8 > self.bf16 {
            return Err(value_err!(
                "{field}: 8-bit bytes (fp8 {}, int8 {}) exceed the 16-bit bytes ({}): give each format's bytes",
                self.fp8,
                self.int8,
                self.bf16
            ));
        }
        Ok(())
    }
}

/// A unit of the diffusion model that is resident or streamed as a whole (a transformer block, a UNet
/// stage, or the rest of the model).
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub name: String,
    pub bytes: FormatBytes,
    /// Elements of its largest single layer (what one streaming or cast buffer must hold).
    pub largest_layer_params: u64,
}

/// A model loaded beside the diffusion model: a text encoder or the VAE (bytes as loaded).
#[derive(Clone, Debug, PartialEq)]
pub struct Component {
    pub name: String,
    pub bytes: u64,
}

/// Which family the first-principles activation estimate treats it as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// A UNet (SD1.5, SDXL): convolution stages plus transformer blocks at a few resolutions.
    Unet,
    /// A diffusion transformer over image or video tokens (Flux, Qwen-Image, Wan, HunyuanVideo).
    Dit,
}

impl Family {
    pub fn parse(name: &str) -> CoreResult<Self> {
        match name {
            "unet" => Ok(Family::Unet),
            "dit" => Ok(Family::Dit),
            other => Err(value_err!(
                "model_profile['family'] must be \"unet\" or \"dit\"; got {other:?}"
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Family::Unet => "unet",
            Family::Dit => "dit",
        }
    }
}

/// The numbers of an architecture that size its activations and its compute.
#[derive(Clone, Debug, PartialEq)]
pub struct Arch {
    pub family: Family,
    /// ComfyUI's `memory_usage_factor` for this model.
    pub memory_usage_factor: f64,
    /// Latent channels, spatial downscale of the VAE (8 or 16) and temporal downscale (1 for images, 4
    /// for the video VAEs: `(frames - 1) / 4 + 1` latent frames).
    pub latent_channels: u64,
    pub latent_spatial: u64,
    pub latent_temporal: u64,
    /// Spatial patch on the latent of the largest attention (2 for the DiTs' 2x2 patches; for a UNet the
    /// downscale of its first attention level: 1 for SD1.5, 2 for SDXL).
    pub patch: u64,
    /// Text tokens in joint attention with the image tokens (Flux 512); 0 where text enters by
    /// cross-attention (Wan, UNets).
    pub joint_text_tokens: u64,
    /// Width of the residual stream and of the widest per-token intermediate tensor (Flux's single-block
    /// `linear1` output: 3 x 3072 + 12288 = 21504).
    pub hidden: u64,
    pub widest: u64,
    /// Live tensors at the peak in units of the widest intermediate (about 3 for a DiT block).
    pub activation_factor: f64,
    pub heads: u64,
    /// Attention layers at the token count above, per forward pass.
    pub attention_layers: u64,
    /// Matmul FLOPs per token per forward pass, attention scores excluded; 0 means 2 x parameters.
    pub flops_per_token: f64,
    /// Whether a job runs classifier-free guidance (cond and uncond in one batch) by default; guidance-
    /// distilled models (Flux-dev, HunyuanVideo) do not.
    pub cfg: bool,
    /// First-principles VAE decode working set per output pixel (per frame of the decode window), and how
    /// many output frames the decoder holds at once (1 for images; causal video VAEs decode a few at a time).
    pub vae_decode_bytes_per_pixel: u64,
    pub vae_decode_frames: u64,
    /// ComfyUI's `memory_used_decode` constant per latent pixel (2178 x 64 for the KL VAE, 2800 x 64 per
    /// decoded frame for the causal video VAEs).
    pub comfy_vae_decode_per_latent: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelProfile {
    pub name: String,
    /// The format the diffusion model's weights are loaded in.
    pub weights_format: Format,
    pub blocks: Vec<Block>,
    pub text_encoders: Vec<Component>,
    pub vae: Option<Component>,
    pub arch: Arch,
}

impl ModelProfile {
    pub fn weight_bytes(&self, f: Format) -> u64 {
        self.blocks
            .iter()
            .fold(0u64, |s, b| s.saturating_add(b.bytes.get(f)))
    }

    pub fn params(&self) -> u64 {
        self.weight_bytes(Format::Bf16) / 2
    }

    pub fn largest_layer_params(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| b.largest_layer_params)
            .max()
            .unwrap_or(0)
    }

    pub fn text_encoder_bytes(&self) -> u64 {
        self.text_encoders
            .iter()
            .fold(0u64, |s, c| s.saturating_add(c.bytes))
    }

    pub fn vae_bytes(&self) -> u64 {
        self.vae.as_ref().map_or(0, |v| v.bytes)
    }

    pub fn validate(&self) -> CoreResult<()> {
        if self.name.is_empty() {
            return Err(value_err!(
                "model_profile['name'] must be a non-empty string"
            ));
        }
        if self.blocks.is_empty() {
            return Err(value_err!(
                "model_profile['blocks'] must list at least one block"
            ));
        }
        for (i, b) in self.blocks.iter().enumerate() {
            b.bytes
                .check(&format!("model_profile['blocks'][{i}]['bytes']"))?;
        }
        let a = &self.arch;
        let positive = [
            ("latent_channels", a.latent_channels),
            ("latent_spatial", a.latent_spatial),
            ("latent_temporal", a.latent_temporal),
            ("patch", a.patch),
            ("hidden", a.hidden),
            ("widest", a.widest),
            ("heads", a.heads),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(value_err!(
                    "model_profile['{name}'] must be a positive int; got 0"
                ));
            }
        }
        let finite = [
            ("memory_usage_factor", a.memory_usage_factor),
            ("activation_factor", a.activation_factor),
            ("flops_per_token", a.flops_per_token),
        ];
        for (name, v) in finite {
            if !v.is_finite() || v < 0.0 {
                return Err(value_err!(
                    "model_profile['{name}'] must be a finite number >= 0; got {v}"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Os {
    Linux,
    Windows,
    Macos,
}

impl Os {
    pub fn parse(name: &str) -> CoreResult<Self> {
        match name {
            "linux" => Ok(Os::Linux),
            "windows" => Ok(Os::Windows),
            "macos" | "darwin" => Ok(Os::Macos),
            other => Err(value_err!(
                "device['os'] must be \"linux\", \"windows\" or \"macos\"; got {other:?}"
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Os::Linux => "linux",
            Os::Windows => "windows",
            Os::Macos => "macos",
        }
    }
}

/// Who decides what stays on the GPU: ComfyUI's Dynamic VRAM (comfy-aimdo) or the legacy loader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryManager {
    Dynamic,
    Legacy,
}

impl MemoryManager {
    pub fn parse(name: &str) -> CoreResult<Self> {
        match name {
            "dynamic" => Ok(MemoryManager::Dynamic),
            "legacy" => Ok(MemoryManager::Legacy),
            other => Err(value_err!(
                "device['memory_manager'] must be \"dynamic\" or \"legacy\"; got {other:?}"
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            MemoryManager::Dynamic => "dynamic",
            MemoryManager::Legacy => "legacy",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct DeviceProfile {
    pub name: String,
    /// Device memory (dedicated VRAM only: the Windows shared-memory fallback is never counted).
    pub total_bytes: u64,
    /// Memory this job can have now (0 = unknown: the budget alone limits).
    pub free_bytes: u64,
    /// Compute capability, e.g. (8, 9); None for a device that is not CUDA.
    pub compute_capability: Option<(u32, u32)>,
    pub bf16: bool,
    pub fp8_matmul: bool,
    pub int8_matmul: bool,
    /// Whether the attention ComfyUI uses by default is memory-efficient (PyTorch SDPA / flash /
    /// xformers / sage): true on any CUDA torch >= 2.
    pub efficient_attention: bool,
    /// Pinned host-to-device bandwidth, GB/s (1e9 bytes).
    pub h2d_gbps: f64,
    /// Device memory bandwidth, GB/s.
    pub memory_gbps: f64,
    /// Effective dense 16-bit matmul throughput, TFLOPS.
    pub tflops: f64,
    /// System RAM (0 = unknown: not checked).
    pub ram_bytes: u64,
    pub os: Os,
    pub memory_manager: MemoryManager,
    /// ComfyUI's async offload streams (`NUM_STREAMS`, 2 on NVIDIA).
    pub streams: u64,
    /// ComfyUI's reserve as the running ComfyUI reports it (`extra_reserved_memory()`,
    /// `minimum_inference_memory()`), overriding the rule by OS (e.g. `--reserve-vram`, or 0 on a CPU).
    pub extra_reserved_bytes: Option<u64>,
    pub minimum_inference_bytes: Option<u64>,
}

impl DeviceProfile {
    /// Capabilities from a compute capability: bf16 on sm >= 8.0, fp8 matmul on sm >= 8.9, int8 matmul
    /// on sm >= 7.5.
    pub fn capabilities(cc: Option<(u32, u32)>) -> (bool, bool, bool) {
        match cc {
            Some(cc) => (cc >= (8, 0), cc >= (8, 9), cc >= (7, 5)),
            None => (false, false, false),
        }
    }

    /// A reference NVIDIA GPU with `vram` bytes (RTX 4090-class speed: sm 8.9, 100 effective TFLOPS,
    /// 1000 GB/s, pinned PCIe 4.0 at 24.7 GB/s), Linux, Dynamic VRAM, RAM unknown.
    pub fn reference(vram: u64) -> Self {
        let cc = Some((8, 9));
        let (bf16, fp8_matmul, int8_matmul) = Self::capabilities(cc);
        DeviceProfile {
            name: "reference GPU (RTX 4090-class speed)".into(),
            total_bytes: vram,
            free_bytes: vram,
            compute_capability: cc,
            bf16,
            fp8_matmul,
            int8_matmul,
            efficient_attention: true,
            h2d_gbps: 24.7,
            memory_gbps: 1000.0,
            tflops: 100.0,
            ram_bytes: 0,
            os: Os::Linux,
            memory_manager: MemoryManager::Dynamic,
            streams: 2,
            extra_reserved_bytes: None,
            minimum_inference_bytes: None,
        }
    }

    /// ComfyUI's `EXTRA_RESERVED_VRAM`: 400 MiB, 600 MiB on Windows (+100 MiB on cards above 15 GiB).
    pub fn extra_reserved(&self) -> u64 {
        if let Some(bytes) = self.extra_reserved_bytes {
            return bytes;
        }
        match self.os {
            Os::Windows if self.total_bytes > 15 * GIB => 700 * MIB,
            Os::Windows => 600 * MIB,
            _ => 400 * MIB,
        }
    }

    /// ComfyUI's `minimum_inference_memory()`: 0.8 GiB plus the extra reserve.
    pub fn minimum_inference(&self) -> u64 {
        self.minimum_inference_bytes
            .unwrap_or(GIB * 8 / 10 + self.extra_reserved())
    }

    /// The share of RAM ComfyUI pins for fast transfers (`MAX_PINNED_MEMORY`: 40% on Windows, 90% else).
    pub fn pinned_fraction(&self) -> f64 {
        match self.os {
            Os::Windows => 0.4,
            _ => 0.9,
        }
    }

    pub fn validate(&self) -> CoreResult<()> {
        let rates = [
            ("h2d_gbps", self.h2d_gbps),
            ("memory_gbps", self.memory_gbps),
            ("tflops", self.tflops),
        ];
        for (name, v) in rates {
            if !v.is_finite() || v <= 0.0 {
                return Err(value_err!(
                    "device['{name}'] must be a finite number > 0; got {v}"
                ));
            }
        }
        if self.total_bytes == 0 {
            return Err(value_err!("device['total_bytes'] must be positive"));
        }
        Ok(())
    }
}

/// Which activation estimate decides whether a plan fits (all three are always reported).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Estimate {
    /// Ours: tokens x widest intermediate x bytes x live-tensor factor (the realistic peak).
    FirstPrinciples,
    /// ComfyUI's `memory_required` (padded; what its loader frees before sampling).
    Comfy,
}

impl Estimate {
    pub fn parse(name: &str) -> CoreResult<Self> {
        match name {
            "first_principles" => Ok(Estimate::FirstPrinciples),
            "comfy" => Ok(Estimate::Comfy),
            other => Err(value_err!(
                "job['estimate'] must be \"first_principles\" or \"comfy\"; got {other:?}"
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Estimate::FirstPrinciples => "first_principles",
            Estimate::Comfy => "comfy",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub width: u64,
    pub height: u64,
    pub frames: u64,
    pub batch: u64,
    /// Classifier-free guidance (cond + uncond batched); None = the model's default.
    pub cfg: Option<bool>,
    pub estimate: Estimate,
    /// Calibration from a measured run: multiplies the activation estimate and the step time.
    pub activation_scale: f64,
    pub time_scale: f64,
}

impl Job {
    pub fn image(width: u64, height: u64) -> Self {
        Job {
            width,
            height,
            frames: 1,
            batch: 1,
            cfg: None,
            estimate: Estimate::FirstPrinciples,
            activation_scale: 1.0,
            time_scale: 1.0,
        }
    }

    pub fn validate(&self, model: &ModelProfile) -> CoreResult<()> {
        for (name, v) in [
            ("width", self.width),
            ("height", self.height),
            ("frames", self.frames),
            ("batch", self.batch),
        ] {
            if v == 0 || v > 1 << 20 {
                return Err(value_err!(
                    "job['{name}'] must be an int from 1 to {}; got {v}",
                    1u64 << 20
                ));
            }
        }
        if self.frames > 1 && model.arch.latent_temporal == 1 {
            return Err(value_err!(
                "job['frames'] must be 1 for {} (an image model); got {}",
                model.name,
                self.frames
            ));
        }
        for (name, v) in [
            ("activation_scale", self.activation_scale),
            ("time_scale", self.time_scale),
        ] {
            if !v.is_finite() || v <= 0.0 || v > 100.0 {
                return Err(value_err!(
                    "job['{name}'] must be a number in (0, 100]; got {v}"
                ));
            }
        }
        Ok(())
    }

    pub fn cfg(&self, model: &ModelProfile) -> bool {
        self.cfg.unwrap_or(model.arch.cfg)
    }

    /// Latent frames: `(frames - 1) / temporal + 1` for a video VAE, 1 for images.
    pub fn latent_frames(&self, model: &ModelProfile) -> u64 {
        if model.arch.latent_temporal <= 1 {
            1
        } else {
            (self.frames - 1) / model.arch.latent_temporal + 1
        }
    }
}
