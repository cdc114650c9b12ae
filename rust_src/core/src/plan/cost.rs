//! The memory and time a configuration of the ladder is predicted to need: activations (ComfyUI's padded
//! formula and our first-principles figure), attention, weights resident and streamed, ComfyUI's reserve,
//! the text-encode and VAE-decode phases, system RAM, and the time of one sampling step.
//!
//! The model, in one paragraph. While sampling, device memory holds the resident weights, the streaming
//! and cast buffers, the activations of one block, the attention workspace, the text encoder and VAE if
//! they were not offloaded, and ComfyUI's reserve: `load_models_gpu` keeps
//! `max(minimum_inference_memory, memory_required + extra_reserved)` free beyond the weights, so the
//! non-weight part is `max(0.8 GiB + extra, activations + attention + extra)`. A step costs the matmul
//! FLOPs at the device's throughput, the attention (plus its score traffic when the scores are
//! materialized), the dequantization of 8-bit weights (read 1 byte, write 2, per weight), and the streamed
//! bytes over PCIe (pinned at the measured rate, pageable beyond ComfyUI's pinning cap at half of it).

use super::profile::{DeviceProfile, Estimate, Family, Format, Job, ModelProfile, GIB, MIB};

/// Overhead of the process in system RAM (Python, torch, ComfyUI) counted in a plan's RAM need.
pub const RAM_OVERHEAD: u64 = 2 * GIB;
/// Working set of a text encoder while it encodes (sequence of a few hundred tokens).
pub const TEXT_ENCODE_ACTIVATIONS: u64 = 256 * MIB;
/// Room ComfyUI needs to stream a text encoder that does not fit (a few of its layers in flight).
pub const TEXT_ENCODER_STREAM_BUFFER: u64 = 512 * MIB;
/// Tile edge of ComfyUI's tiled VAE decode fallback, in output pixels.
pub const VAE_TILE: u64 = 512;
/// Residency is decided in aimdo's 32 MiB pages.
pub const PAGE: u64 = 32 * MIB;

/// How attention is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AttentionMode {
    /// Whatever ComfyUI uses on this device (efficient when `device.efficient_attention`).
    Default,
    /// Memory-efficient attention (PyTorch SDPA / flash): no score matrix.
    Efficient,
    /// Standard attention computed in this many slices of the query rows.
    Sliced(u32),
}

/// One point of the ladder's search space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    /// Load fp32 weights as 16-bit (bf16 where supported, else fp16) and compute in 16-bit.
    pub sixteen_bit: bool,
    pub attention: AttentionMode,
    pub offload_text_encoder: bool,
    pub offload_vae: bool,
    /// Store the diffusion model's weights in 8 bits (`DeviceProfile::eight_bit_format`).
    pub eight_bit: bool,
    /// Layer streaming: this many bytes of weights stay resident, the rest stream each step.
    pub resident: Option<u64>,
}

impl Config {
    pub const NOTHING: Config = Config {
        sixteen_bit: false,
        attention: AttentionMode::Default,
        offload_text_encoder: false,
        offload_vae: false,
        eight_bit: false,
        resident: None,
    };
}

/// The 8-bit format the ladder uses on a device: fp8 where fp8 matmuls run (sm >= 8.9, ComfyUI's native
/// `float8_e4m3fn`), int8 with per-row scales elsewhere (ComfyUI's `int8_tensorwise`).
pub fn eight_bit_format(device: &DeviceProfile) -> Format {
    if device.fp8_matmul {
        Format::Fp8
    } else {
        Format::Int8
    }
}

/// The 16-bit format the precision rung uses on a device.
pub fn sixteen_bit_format(device: &DeviceProfile) -> Format {
    if device.bf16 {
        Format::Bf16
    } else {
        Format::Fp16
    }
}

/// The three activation figures for a job (bytes), reported whichever decides.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Activations {
    /// ComfyUI's `memory_required` for the sampling batch (`2 x batch`, as `estimate_memory` asks).
    pub comfy: u64,
    /// ComfyUI's `minimum_memory_required` (batch x 1).
    pub comfy_minimum: u64,
    /// Under Dynamic VRAM ComfyUI pads it further: `x 1.3 + 1 GiB`.
    pub comfy_dynamic: u64,
    /// Ours: the live tensors of one block at its widest intermediate.
    pub first_principles: u64,
    /// Tokens in the largest attention and the effective batch (x2 with CFG).
    pub tokens: u64,
    pub batch: u64,
}

fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b.max(1))
}

fn mul_f(bytes: u64, f: f64) -> u64 {
    let v = bytes as f64 * f;
    if v >= u64::MAX as f64 {
        u64::MAX
    } else {
        v.ceil() as u64
    }
}

/// Image (or video) tokens of the largest attention, text tokens in joint attention included.
pub fn tokens(model: &ModelProfile, job: &Job) -> u64 {
    let a = &model.arch;
    let scale = a.latent_spatial.saturating_mul(a.patch);
    let t = job.latent_frames(model);
    t.saturating_mul(ceil_div(job.height, scale))
        .saturating_mul(ceil_div(job.width, scale))
        .saturating_add(a.joint_text_tokens)
}

/// Latent elements per sample as ComfyUI's `memory_required` counts its area: `prod(shape[2:])`.
fn latent_area(model: &ModelProfile, job: &Job) -> u64 {
    let s = model.arch.latent_spatial;
    job.latent_frames(model)
        .saturating_mul(ceil_div(job.height, s))
        .saturating_mul(ceil_div(job.width, s))
}

pub fn activations(
    model: &ModelProfile,
    job: &Job,
    compute_bytes: u64,
    efficient: bool,
) -> Activations {
    let a = &model.arch;
    let batch = job.batch.saturating_mul(if job.cfg(model) { 2 } else { 1 });
    let area = latent_area(model, job);
    let comfy_for = |samples: u64| -> u64 {
        let area = samples.saturating_mul(area) as f64;
        let per = if efficient {
            compute_bytes as f64 * 0.01
        } else {
            0.15
        };
        let v = area * per * a.memory_usage_factor * MIB as f64;
        if v >= u64::MAX as f64 {
            u64::MAX
        } else {
            v as u64
        }
    };
    let comfy = comfy_for(job.batch.saturating_mul(2));
    let n = tokens(model, job);
    let first = mul_f(
        batch
            .saturating_mul(n)
            .saturating_mul(a.widest)
            .saturating_mul(compute_bytes),
        a.activation_factor * job.activation_scale,
    );
    Activations {
        comfy,
        comfy_minimum: comfy_for(job.batch),
        comfy_dynamic: mul_f(comfy, 1.3).saturating_add(GIB),
        first_principles: first,
        tokens: n,
        batch,
    }
}

/// Bytes of device memory while sampling, by component. They sum to the sampling peak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Components {
    pub weights: u64,
    pub streaming_buffers: u64,
    pub activations: u64,
    pub attention: u64,
    pub text_encoder: u64,
    pub vae: u64,
    pub reserve: u64,
}

impl Components {
    pub fn total(&self) -> u64 {
        self.named()
            .iter()
            .fold(0u64, |s, (_, v)| s.saturating_add(*v))
    }

    /// In a fixed order, with the names of the JSON output.
    pub fn named(&self) -> [(&'static str, u64); 7] {
        [
            ("weights", self.weights),
            ("streaming_buffers", self.streaming_buffers),
            ("activations", self.activations),
            ("attention", self.attention),
            ("text_encoder", self.text_encoder),
            ("vae", self.vae),
            ("reserve", self.reserve),
        ]
    }
}

/// Seconds of one sampling step, by cause.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct StepTime {
    pub compute: f64,
    pub attention: f64,
    pub dequantize: f64,
    pub transfer: f64,
    pub total: f64,
}

/// Everything predicted for one configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub config: Config,
    pub weights_format: Format,
    pub compute_bytes: u64,
    pub activations: Activations,
    pub components: Components,
    /// Peak while sampling (the sum of `components`).
    pub peak: u64,
    pub weights_total: u64,
    pub streamed_bytes: u64,
    /// Peak of the text-encode phase if the text encoders load whole, and the least it can be when
    /// ComfyUI streams them.
    pub encode_peak: u64,
    pub encode_min: u64,
    /// Peak of the VAE decode, whole and in tiles (ComfyUI falls back to tiles on out-of-memory).
    pub decode_peak: u64,
    pub decode_min: u64,
    /// ComfyUI's own VAE decode estimate (`memory_used_decode`), reported.
    pub comfy_decode: u64,
    /// System RAM held while sampling: the streamed weights, what was offloaded, and the process.
    pub ram_needed: u64,
    pub time: StepTime,
}

impl Evaluation {
    /// Whether every phase fits `budget` and the RAM fits `ram` (0 = not checked).
    pub fn fits(&self, budget: u64, ram: u64) -> bool {
        self.peak <= budget
            && self.encode_min <= budget
            && self.decode_min <= budget
            && (ram == 0 || self.ram_needed <= ram)
    }
}

/// The attention workspace (bytes) and its time beyond the matmuls (seconds) for a mode.
fn attention_cost(
    model: &ModelProfile,
    device: &DeviceProfile,
    mode: AttentionMode,
    n: u64,
    batch: u64,
) -> (u64, f64, f64) {
    let a = &model.arch;
    let efficient = match mode {
        AttentionMode::Default => device.efficient_attention,
        AttentionMode::Efficient => true,
        AttentionMode::Sliced(_) => false,
    };
    let flops = 4.0 * batch as f64 * (n as f64) * (n as f64) * a.hidden as f64;
    let matmul_s = flops * a.attention_layers as f64 / (device.tflops * 1e12);
    // Memory-efficient kernels keep a log-sum-exp row per query; standard attention holds the float32
    // scores and probabilities of one layer at a time.
    if efficient {
        let bytes = batch
            .saturating_mul(a.heads)
            .saturating_mul(n)
            .saturating_mul(4);
        return (bytes, matmul_s, 0.0);
    }
    let slices = match mode {
        AttentionMode::Sliced(s) => u64::from(s.max(1)),
        _ => 1,
    };
    let rows = ceil_div(n, slices);
    let bytes = batch
        .saturating_mul(a.heads)
        .saturating_mul(rows)
        .saturating_mul(n)
        .saturating_mul(8);
    // Scores written, read and written by softmax, read by the PV product: 3 passes over the full
    // matrix per layer; each halving of the slices adds a tenth (kernel launches, smaller GEMMs).
    let full = batch as f64 * a.heads as f64 * (n as f64) * (n as f64) * 8.0;
    let traffic_s = 3.0 * full * a.attention_layers as f64 / (device.memory_gbps * 1e9);
    let slowdown = 1.0 + 0.1 * (slices as f64).log2();
    (
        bytes,
        matmul_s,
        traffic_s * slowdown + matmul_s * (slowdown - 1.0),
    )
}

/// The first-principles working set of the VAE decode for `width x height` (and the frames it holds).
fn vae_decode_bytes(model: &ModelProfile, width: u64, height: u64, frames: u64) -> u64 {
    let a = &model.arch;
    let window = frames.min(a.vae_decode_frames.max(1));
    width
        .saturating_mul(height)
        .saturating_mul(window)
        .saturating_mul(a.vae_decode_bytes_per_pixel)
}

/// ComfyUI's rule for what it keeps free beyond the weights: `max(minimum_inference, needed + extra)`.
/// Returns the reserve on top of `needed`.
fn reserve_beyond(device: &DeviceProfile, needed: u64) -> u64 {
    let total = device
        .minimum_inference()
        .max(needed.saturating_add(device.extra_reserved()));
    total - needed
}

pub fn evaluate(
    model: &ModelProfile,
    device: &DeviceProfile,
    job: &Job,
    config: &Config,
) -> Evaluation {
    let loaded = model.weights_format;
    let fp32_compute = loaded == Format::Fp32 && !config.sixteen_bit;
    let compute_bytes = if fp32_compute { 4 } else { 2 };
    let weights_format = if config.eight_bit && !loaded.is_8bit() {
        eight_bit_format(device)
    } else if loaded == Format::Fp32 && config.sixteen_bit {
        sixteen_bit_format(device)
    } else {
        loaded
    };
    let efficient = match config.attention {
        AttentionMode::Default => device.efficient_attention,
        AttentionMode::Efficient => true,
        AttentionMode::Sliced(_) => false,
    };
    let acts = activations(model, job, compute_bytes, efficient);
    let (mut attention_bytes, attention_matmul_s, attention_extra_s) =
        attention_cost(model, device, config.attention, acts.tokens, acts.batch);
    let activation_bytes = match job.estimate {
        Estimate::FirstPrinciples => acts.first_principles,
        Estimate::Comfy => {
            // ComfyUI's figure covers attention too.
            attention_bytes = 0;
            let base = match device.memory_manager {
                super::profile::MemoryManager::Dynamic => acts.comfy_dynamic,
                super::profile::MemoryManager::Legacy => acts.comfy,
            };
            mul_f(base, job.activation_scale)
        }
    };

    let total = model.weight_bytes(weights_format);
    let largest = model.largest_layer_params();
    let (resident, streamed) = match config.resident {
        Some(r) if r < total => (r, total - r),
        _ => (total, 0),
    };
    let stored_layer = largest.saturating_mul(weights_format.element_bytes());
    let cast_layer = largest.saturating_mul(compute_bytes);
    let mut buffers = 0u64;
    if streamed > 0 {
        // ComfyUI streams a layer while `streams` more are in flight, each cast to the compute dtype.
        buffers = buffers.saturating_add(device.streams.saturating_mul(stored_layer));
    }
    if streamed > 0 || weights_format.is_8bit() || weights_format.element_bytes() != compute_bytes {
        buffers = buffers.saturating_add(cast_layer);
    }
    let te = model.text_encoder_bytes();
    let vae = model.vae_bytes();
    let text_encoder = if config.offload_text_encoder { 0 } else { te };
    let vae_resident = if config.offload_vae { 0 } else { vae };
    let needed = activation_bytes.saturating_add(attention_bytes);
    let components = Components {
        weights: resident,
        streaming_buffers: buffers,
        activations: activation_bytes,
        attention: attention_bytes,
        text_encoder,
        vae: vae_resident,
        reserve: reserve_beyond(device, needed),
    };
    let peak = components.total();

    // Text-encode phase: the encoders alone (the diffusion model is loaded after them on a first run).
    let encode_needed = if te > 0 { TEXT_ENCODE_ACTIVATIONS } else { 0 };
    let encode_reserve = reserve_beyond(device, encode_needed).saturating_add(encode_needed);
    let encode_peak = te.saturating_add(encode_reserve);
    let encode_min = te
        .min(TEXT_ENCODER_STREAM_BUFFER)
        .saturating_add(encode_reserve);

    // VAE decode phase: ComfyUI unloads the diffusion model as needed for the VAE.
    let frames = if model.arch.latent_temporal > 1 {
        job.frames
    } else {
        1
    };
    let decode_full = vae_decode_bytes(model, job.width, job.height, frames).saturating_mul(
        if model.arch.family == Family::Unet || model.arch.vae_decode_frames <= 1 {
            job.batch
        } else {
            1
        },
    );
    let decode_tiled = vae_decode_bytes(
        model,
        job.width.min(VAE_TILE),
        job.height.min(VAE_TILE),
        frames,
    );
    let decode_peak = if vae > 0 {
        vae.saturating_add(decode_full)
            .saturating_add(reserve_beyond(device, decode_full))
    } else {
        0
    };
    let decode_min = if vae > 0 {
        vae.saturating_add(decode_tiled)
            .saturating_add(reserve_beyond(device, decode_tiled))
    } else {
        0
    };
    // ComfyUI's `memory_used_decode`: per latent pixel for the KL VAEs (2178 x 64), and for the causal
    // video VAEs per latent pixel times min(8, 4 (T - 1) + 1) frames (2800 x 64).
    let s = model.arch.latent_spatial;
    let latent_pixels = ceil_div(job.height, s).saturating_mul(ceil_div(job.width, s));
    let decode_frames = if model.arch.latent_temporal > 1 {
        (4 * (job.latent_frames(model) - 1) + 1).min(8)
    } else {
        1
    };
    let comfy_decode = latent_pixels
        .saturating_mul(decode_frames)
        .saturating_mul(model.arch.comfy_vae_decode_per_latent)
        .saturating_mul(compute_bytes)
        .saturating_mul(job.batch);

    let offloaded = (if config.offload_text_encoder { te } else { 0 })
        .saturating_add(if config.offload_vae { vae } else { 0 });
    let ram_needed = RAM_OVERHEAD
        .saturating_add(streamed)
        .saturating_add(offloaded);

    // Time of one step.
    let a = &model.arch;
    let flops_per_token = if a.flops_per_token > 0.0 {
        a.flops_per_token
    } else {
        2.0 * model.params() as f64
    };
    // 16-bit matmuls run about twice as fast as fp32 on a GPU's tensor cores; a CPU gains nothing.
    let fp32_penalty = fp32_compute && device.compute_capability.is_some();
    let rate = device.tflops * 1e12 * if fp32_penalty { 0.5 } else { 1.0 };
    let compute = flops_per_token * acts.tokens as f64 * acts.batch as f64 / rate;
    let attention = attention_matmul_s * if fp32_penalty { 2.0 } else { 1.0 } + attention_extra_s;
    let dequantize = if weights_format.is_8bit() {
        total as f64 * 3.0 / (device.memory_gbps * 1e9)
    } else {
        0.0
    };
    let transfer = if streamed > 0 {
        let pinned_cap = if device.ram_bytes == 0 {
            u64::MAX
        } else {
            (device.ram_bytes as f64 * device.pinned_fraction()) as u64
        };
        let pinned = streamed.min(pinned_cap);
        let pageable = streamed - pinned;
        let rate = device.h2d_gbps * 1e9;
        pinned as f64 / rate + pageable as f64 / (rate * 0.5)
    } else {
        0.0
    };
    let total_s = (compute + attention + dequantize + transfer) * job.time_scale;
    Evaluation {
        config: *config,
        weights_format,
        compute_bytes,
        activations: acts,
        components,
        peak,
        weights_total: total,
        streamed_bytes: streamed,
        encode_peak,
        encode_min,
        decode_peak,
        decode_min,
        comfy_decode,
        ram_needed,
        time: StepTime {
            compute: compute * job.time_scale,
            attention: attention * job.time_scale,
            dequantize: dequantize * job.time_scale,
            transfer: transfer * job.time_scale,
            total: total_s,
        },
    }
}
