//! The escalation ladder, searched: the plan with the lowest predicted step time whose predicted memory
//! fits the budget, built from the rungs users know (16-bit precision, memory-efficient attention, text
//! encoder and VAE offload, 8-bit weights, layer streaming with a resident budget, attention slicing).
//!
//! The search is exact over a candidate set that does not depend on the budget: every combination of the
//! discrete rungs, each with the largest resident share (in 32 MiB pages) its memory leaves room for.
//! Hence more memory never gives a slower plan (the feasible set only grows) and the result is
//! deterministic. Ties go to fewer steps, then to rungs earlier on the ladder, so every step of a plan is
//! needed: without it the plan would not fit, or would be slower.
//!
//! A plan that needs more system RAM than the device profile has is not a plan, and neither is one that
//! would fit only in the Windows driver's shared-memory fallback: the budget never exceeds the dedicated
//! memory the device reports.

use super::cost::{evaluate, AttentionMode, Config, Evaluation, PAGE};
use super::profile::{DeviceProfile, Format, Job, ModelProfile, Os, GIB, MIB};
use crate::error::CoreResult;
use crate::value_err;

/// Slice counts the search tries for attention slicing.
pub const SLICES: [u32; 8] = [2, 4, 8, 16, 32, 64, 128, 256];

/// The rungs, in ladder order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rung {
    SixteenBit,
    EfficientAttention,
    OffloadTextEncoder,
    OffloadVae,
    EightBit,
    LayerStreaming,
    AttentionSlicing,
}

impl Rung {
    pub const ALL: [Rung; 7] = [
        Rung::SixteenBit,
        Rung::EfficientAttention,
        Rung::OffloadTextEncoder,
        Rung::OffloadVae,
        Rung::EightBit,
        Rung::LayerStreaming,
        Rung::AttentionSlicing,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rung::SixteenBit => "precision_16bit",
            Rung::EfficientAttention => "efficient_attention",
            Rung::OffloadTextEncoder => "offload_text_encoder",
            Rung::OffloadVae => "offload_vae",
            Rung::EightBit => "weights_8bit",
            Rung::LayerStreaming => "layer_streaming",
            Rung::AttentionSlicing => "attention_slicing",
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// The launch-flag presets: `Auto` searches; the others fix the rungs the way the flag would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Auto,
    /// `--gpu-only`: everything stays on the GPU, nothing is applied.
    GpuOnly,
    /// `--medvram`: text encoder and VAE offloaded; layers stream only if the rest does not fit.
    MedVram,
    /// `--lowvram`: offloads, and the model split: at most (free - 1 GiB) / 1.3 resident, ComfyUI's
    /// historical low-VRAM rule; attention sliced where the default attention holds the score matrix.
    LowVram,
    /// `--novram`: offloads, and every layer streams.
    NoVram,
}

impl Preset {
    pub fn parse(name: &str) -> CoreResult<Self> {
        match name {
            "auto" => Ok(Preset::Auto),
            "gpu-only" => Ok(Preset::GpuOnly),
            "medvram" => Ok(Preset::MedVram),
            "lowvram" => Ok(Preset::LowVram),
            "novram" => Ok(Preset::NoVram),
            other => Err(value_err!(
                "preset must be one of \"auto\", \"gpu-only\", \"medvram\", \"lowvram\", \"novram\"; got {other:?}"
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Preset::Auto => "auto",
            Preset::GpuOnly => "gpu-only",
            Preset::MedVram => "medvram",
            Preset::LowVram => "lowvram",
            Preset::NoVram => "novram",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub rung: Rung,
    pub action: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub fits: bool,
    pub preset: Preset,
    pub steps: Vec<Step>,
    /// The chosen configuration and everything predicted for it (when nothing fits: the configuration
    /// with the smallest peak).
    pub evaluation: Evaluation,
    /// The budget planned for (the request, capped at the device's dedicated memory).
    pub budget: u64,
    pub requested_budget: u64,
    /// The least budget any configuration needs (its sampling, encode and decode phases all fit).
    pub min_budget: u64,
    pub notes: Vec<String>,
    /// When nothing fits: what would make it fit.
    pub suggestions: Vec<String>,
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / GIB as f64)
}

fn mib(b: u64) -> String {
    if b >= GIB {
        gib(b)
    } else {
        format!("{:.0} MiB", b as f64 / MIB as f64)
    }
}

fn ms(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.0} ms", s * 1000.0)
    }
}

/// The rungs a configuration applies (as a bit set, in ladder order).
pub fn rungs_of(model: &ModelProfile, device: &DeviceProfile, e: &Evaluation) -> Vec<Rung> {
    let c = &e.config;
    let mut out = Vec::new();
    if c.sixteen_bit && model.weights_format == Format::Fp32 {
        out.push(Rung::SixteenBit);
    }
    if c.attention == AttentionMode::Efficient && !device.efficient_attention {
        out.push(Rung::EfficientAttention);
    }
    if c.offload_text_encoder && model.text_encoder_bytes() > 0 {
        out.push(Rung::OffloadTextEncoder);
    }
    if c.offload_vae && model.vae_bytes() > 0 {
        out.push(Rung::OffloadVae);
    }
    if c.eight_bit && !model.weights_format.is_8bit() {
        out.push(Rung::EightBit);
    }
    if e.streamed_bytes > 0 {
        out.push(Rung::LayerStreaming);
    }
    if matches!(c.attention, AttentionMode::Sliced(_)) {
        out.push(Rung::AttentionSlicing);
    }
    out
}

fn mask(rungs: &[Rung]) -> u32 {
    rungs.iter().fold(0, |m, r| m | r.bit())
}

/// The discrete configurations the search tries (resident share left open), in a fixed order.
pub fn discrete_configs(model: &ModelProfile, device: &DeviceProfile) -> Vec<Config> {
    let sixteen: &[bool] = if model.weights_format == Format::Fp32 {
        &[false, true]
    } else {
        &[false]
    };
    let mut attention = vec![AttentionMode::Default];
    if !device.efficient_attention {
        attention.push(AttentionMode::Efficient);
        attention.extend(SLICES.iter().map(|&s| AttentionMode::Sliced(s)));
    }
    let te: &[bool] = if model.text_encoder_bytes() > 0 {
        &[false, true]
    } else {
        &[false]
    };
    let vae: &[bool] = if model.vae_bytes() > 0 {
        &[false, true]
    } else {
        &[false]
    };
    let eight: &[bool] = if model.weights_format.is_8bit() {
        &[false]
    } else {
        &[false, true]
    };
    let mut out = Vec::new();
    for &sixteen_bit in sixteen {
        for &att in &attention {
            for &offload_text_encoder in te {
                for &offload_vae in vae {
                    for &eight_bit in eight {
                        out.push(Config {
                            sixteen_bit,
                            attention: att,
                            offload_text_encoder,
                            offload_vae,
                            eight_bit,
                            resident: None,
                        });
                    }
                }
            }
        }
    }
    out
}

/// The configuration `base` with the largest resident share that fits `budget` (everything resident
/// when it all fits); None when not even full streaming fits.
fn best_residency(
    model: &ModelProfile,
    device: &DeviceProfile,
    job: &Job,
    base: Config,
    budget: u64,
) -> Option<Evaluation> {
    let whole = evaluate(
        model,
        device,
        job,
        &Config {
            resident: None,
            ..base
        },
    );
    if whole.fits(budget, device.ram_bytes) {
        return Some(whole);
    }
    let zero = evaluate(
        model,
        device,
        job,
        &Config {
            resident: Some(0),
            ..base
        },
    );
    if zero.streamed_bytes == 0 || zero.peak > budget {
        return None;
    }
    let room = (budget - zero.peak) / PAGE * PAGE;
    let resident = room.min(zero.weights_total.saturating_sub(1) / PAGE * PAGE);
    let e = evaluate(
        model,
        device,
        job,
        &Config {
            resident: Some(resident),
            ..base
        },
    );
    e.fits(budget, device.ram_bytes).then_some(e)
}

/// Orders candidates: faster first, then fewer steps, then rungs earlier on the ladder, then less memory.
fn better(model: &ModelProfile, device: &DeviceProfile, a: &Evaluation, b: &Evaluation) -> bool {
    let (ra, rb) = (rungs_of(model, device, a), rungs_of(model, device, b));
    a.time
        .total
        .total_cmp(&b.time.total)
        .then(ra.len().cmp(&rb.len()))
        .then(mask(&ra).cmp(&mask(&rb)))
        .then(a.peak.cmp(&b.peak))
        .is_lt()
}

/// The fastest fitting evaluation over `configs` for `budget`.
fn search(
    model: &ModelProfile,
    device: &DeviceProfile,
    job: &Job,
    configs: &[Config],
    budget: u64,
) -> Option<Evaluation> {
    let mut best: Option<Evaluation> = None;
    for &c in configs {
        if let Some(e) = best_residency(model, device, job, c, budget) {
            if best.as_ref().is_none_or(|b| better(model, device, &e, b)) {
                best = Some(e);
            }
        }
    }
    best
}

/// The budget a configuration needs with every layer streamed: its least requirement.
fn required_budget(e: &Evaluation) -> u64 {
    e.peak.max(e.encode_min).max(e.decode_min)
}

/// The configuration with the smallest requirement (RAM respected where possible).
fn smallest(
    model: &ModelProfile,
    device: &DeviceProfile,
    job: &Job,
    configs: &[Config],
) -> Evaluation {
    // Least requirement first, then the least sampling peak, then the usual order.
    let mut best: Option<((bool, u64, u64), Evaluation)> = None;
    for &c in configs {
        for resident in [Some(0), None] {
            let e = evaluate(model, device, job, &Config { resident, ..c });
            let ram_ok = device.ram_bytes == 0 || e.ram_needed <= device.ram_bytes;
            let key = (!ram_ok, required_budget(&e), e.peak);
            let replace = match &best {
                None => true,
                Some((k, b)) => key < *k || (key == *k && better(model, device, &e, b)),
            };
            if replace {
                best = Some((key, e));
            }
        }
    }
    best.expect("at least one configuration").1
}

fn preset_configs(preset: Preset, model: &ModelProfile, device: &DeviceProfile) -> Vec<Config> {
    let offload = Config {
        offload_text_encoder: model.text_encoder_bytes() > 0,
        offload_vae: model.vae_bytes() > 0,
        ..Config::NOTHING
    };
    match preset {
        Preset::Auto => discrete_configs(model, device),
        Preset::GpuOnly => vec![Config::NOTHING],
        Preset::MedVram | Preset::NoVram => vec![offload],
        Preset::LowVram => vec![Config {
            attention: if device.efficient_attention {
                AttentionMode::Default
            } else {
                AttentionMode::Sliced(4)
            },
            ..offload
        }],
    }
}

/// Evaluates a preset's fixed configuration for `budget`.
fn preset_evaluation(
    preset: Preset,
    model: &ModelProfile,
    device: &DeviceProfile,
    job: &Job,
    budget: u64,
) -> Option<Evaluation> {
    let base = preset_configs(preset, model, device)[0];
    let fits = |e: Evaluation| e.fits(budget, device.ram_bytes).then_some(e);
    match preset {
        Preset::Auto => unreachable!("auto searches"),
        Preset::GpuOnly => fits(evaluate(model, device, job, &base)),
        Preset::MedVram => best_residency(model, device, job, base, budget),
        Preset::NoVram => fits(evaluate(
            model,
            device,
            job,
            &Config {
                resident: Some(0),
                ..base
            },
        )),
        Preset::LowVram => {
            let zero = evaluate(
                model,
                device,
                job,
                &Config {
                    resident: Some(0),
                    ..base
                },
            );
            let room = budget.saturating_sub(zero.peak);
            let cap = (room.saturating_sub(GIB) as f64 / 1.3) as u64 / PAGE * PAGE;
            let resident = cap.min(zero.weights_total.saturating_sub(1) / PAGE * PAGE);
            fits(evaluate(
                model,
                device,
                job,
                &Config {
                    resident: Some(resident),
                    ..base
                },
            ))
        }
    }
}

/// Plans `job` for `model` on `device` within `budget` bytes (0 = the device's free memory).
pub fn plan_fit(
    model: &ModelProfile,
    device: &DeviceProfile,
    job: &Job,
    budget: u64,
    preset: Preset,
) -> CoreResult<Plan> {
    model.validate()?;
    device.validate()?;
    job.validate(model)?;
    let available = if device.free_bytes > 0 {
        device.free_bytes.min(device.total_bytes)
    } else {
        device.total_bytes
    };
    if budget == 0 && available == 0 {
        return Err(value_err!(
            "budget_bytes is 0 (this GPU) but the device reports no memory"
        ));
    }
    let requested = if budget == 0 { available } else { budget };
    let effective = requested.min(available);
    let mut notes = Vec::new();
    if requested > available {
        let what = if device.os == Os::Windows {
            " (the Windows driver's shared-memory fallback is not counted: it turns out-of-memory into \
             10-50x slower steps)"
        } else {
            ""
        };
        notes.push(format!(
            "The budget ({}) is more than the device has free ({}); planning for {}{what}.",
            gib(requested),
            gib(available),
            gib(effective)
        ));
    }

    let configs = preset_configs(preset, model, device);
    let found = match preset {
        Preset::Auto => search(model, device, job, &configs, effective),
        _ => preset_evaluation(preset, model, device, job, effective),
    };
    let all = discrete_configs(model, device);
    let least = smallest(model, device, job, &all);
    let min_budget = required_budget(&least);
    let (fits, evaluation) = match found {
        Some(e) => (true, e),
        None if preset == Preset::Auto => (false, least.clone()),
        None => {
            // The preset's own configuration, as far as it goes, to show what it would need.
            let base = configs[0];
            let resident = match preset {
                Preset::GpuOnly => None,
                _ => Some(0),
            };
            (
                false,
                evaluate(model, device, job, &Config { resident, ..base }),
            )
        }
    };
    let steps = explain(model, device, job, &evaluation, effective, &all, fits);
    add_notes(&mut notes, model, device, &evaluation, effective);
    let suggestions = if fits {
        Vec::new()
    } else {
        suggest(model, device, job, effective, preset, &least, min_budget)
    };
    Ok(Plan {
        fits,
        preset,
        steps,
        evaluation,
        budget: effective,
        requested_budget: requested,
        min_budget,
        notes,
        suggestions,
    })
}

fn te_names(model: &ModelProfile) -> String {
    model
        .text_encoders
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(" + ")
}

/// One action and one reason per rung of the chosen configuration.
fn explain(
    model: &ModelProfile,
    device: &DeviceProfile,
    job: &Job,
    e: &Evaluation,
    budget: u64,
    all: &[Config],
    fits: bool,
) -> Vec<Step> {
    let rungs = rungs_of(model, device, e);
    // The best plan without a rung, for reasons that compare.
    let without = |rung: Rung| -> Option<Evaluation> {
        let configs: Vec<Config> = all
            .iter()
            .copied()
            .filter(|c| match rung {
                Rung::EightBit => !c.eight_bit,
                Rung::OffloadTextEncoder => !c.offload_text_encoder,
                Rung::OffloadVae => !c.offload_vae,
                _ => true,
            })
            .collect();
        search(model, device, job, &configs, budget)
    };
    let mut steps = Vec::new();
    for rung in rungs {
        let (action, reason) = match rung {
            Rung::SixteenBit => {
                let f = super::cost::sixteen_bit_format(device);
                (
                    format!("Load the weights as {} instead of fp32", f.name()),
                    format!(
                        "Halves the weights ({} to {}) and the activations, and 16-bit matmuls run about twice as fast.",
                        gib(model.weight_bytes(Format::Fp32)),
                        gib(model.weight_bytes(f))
                    ),
                )
            }
            Rung::EfficientAttention => {
                let standard = evaluate(
                    model,
                    device,
                    job,
                    &Config {
                        attention: AttentionMode::Default,
                        ..e.config
                    },
                );
                (
                    "Use memory-efficient attention (PyTorch SDPA)".to_string(),
                    format!(
                        "Standard attention holds a {} score matrix at {} tokens; memory-efficient attention holds none and is faster.",
                        mib(standard.components.attention),
                        e.activations.tokens
                    ),
                )
            }
            Rung::OffloadTextEncoder => {
                let te = model.text_encoder_bytes();
                (
                    format!("Free the text encoder ({}) after encoding", te_names(model)),
                    format!(
                        "It runs once per prompt, so keeping its {} off the GPU while sampling costs nothing per step.",
                        mib(te)
                    ),
                )
            }
            Rung::OffloadVae => {
                let vae = model.vae_bytes();
                (
                    "Keep the VAE off the GPU while sampling".to_string(),
                    format!(
                        "It is needed only to decode, so its {} go to the weights instead (ComfyUI loads it back to decode).",
                        mib(vae)
                    ),
                )
            }
            Rung::EightBit => {
                let f = e.weights_format;
                let sixteen = model.weight_bytes(if model.weights_format == Format::Fp32 {
                    super::cost::sixteen_bit_format(device)
                } else {
                    model.weights_format
                });
                let why = match without(Rung::EightBit) {
                    _ if !fits => "that is the least the weights can take".to_string(),
                    None => "the 16-bit weights do not fit even with every layer streamed".to_string(),
                    Some(alt) => format!(
                        "{} per step beats the best 16-bit plan ({} per step, {} streamed)",
                        ms(e.time.total),
                        ms(alt.time.total),
                        gib(alt.streamed_bytes)
                    ),
                };
                let native = match f {
                    Format::Fp8 => "ComfyUI's native float8_e4m3fn",
                    _ => "ComfyUI's native int8_tensorwise, per-row scales",
                };
                (
                    format!("Store the diffusion model's weights in {} ({native})", f.name()),
                    format!(
                        "They take {} instead of {}, and {why}.",
                        gib(e.weights_total),
                        gib(sixteen)
                    ),
                )
            }
            Rung::LayerStreaming if !fits || e.components.weights == 0 => (
                format!(
                    "Stream every layer ({} from RAM each step)",
                    gib(e.streamed_bytes)
                ),
                format!(
                    "That is the least VRAM the weights can take: buffers for the layers in flight only; it costs about {} per step at {:.1} GB/s.",
                    ms(e.time.transfer),
                    device.h2d_gbps
                ),
            ),
            Rung::LayerStreaming => (
                format!(
                    "Stream layers: keep {} of the weights on the GPU, stream {} from RAM each step",
                    gib(e.components.weights),
                    gib(e.streamed_bytes)
                ),
                format!(
                    "That is the most the budget leaves room for beside {} of buffers, activations and reserve; streaming costs about {} per step at {:.1} GB/s.",
                    gib(e.peak - e.components.weights),
                    ms(e.time.transfer),
                    device.h2d_gbps
                ),
            ),
            Rung::AttentionSlicing => {
                let slices = match e.config.attention {
                    AttentionMode::Sliced(s) => s,
                    _ => 1,
                };
                let whole = evaluate(
                    model,
                    device,
                    job,
                    &Config {
                        attention: AttentionMode::Default,
                        ..e.config
                    },
                );
                (
                    format!("Slice attention into {slices} parts"),
                    format!(
                        "The score matrix ({}) does not fit whole; {slices} slices cut it to {} at slower attention.",
                        mib(whole.components.attention),
                        mib(e.components.attention)
                    ),
                )
            }
        };
        steps.push(Step {
            rung,
            action,
            reason,
        });
    }
    steps
}

fn add_notes(
    notes: &mut Vec<String>,
    model: &ModelProfile,
    device: &DeviceProfile,
    e: &Evaluation,
    budget: u64,
) {
    let te = model.text_encoder_bytes();
    if te > 0 && e.encode_peak > budget {
        notes.push(format!(
            "The text encoder ({}) does not fit whole: ComfyUI streams it while encoding, about {} once per prompt.",
            gib(te),
            ms(te as f64 / (device.h2d_gbps * 1e9))
        ));
    }
    if model.vae_bytes() > 0 && e.decode_peak > budget && e.decode_min <= budget {
        notes.push(format!(
            "A whole VAE decode would need {}: ComfyUI falls back to tiled decoding ({} tiles).",
            gib(e.decode_peak),
            super::cost::VAE_TILE
        ));
    }
    if device.ram_bytes > 0 && e.ram_needed > device.ram_bytes {
        notes.push(format!(
            "It needs {} of system RAM and the device profile has {}: it would swap.",
            gib(e.ram_needed),
            gib(device.ram_bytes)
        ));
    }
}

/// What would make it fit: a budget, RAM, or a smaller job.
fn suggest(
    model: &ModelProfile,
    device: &DeviceProfile,
    job: &Job,
    budget: u64,
    preset: Preset,
    least: &Evaluation,
    min_budget: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    if preset != Preset::Auto {
        let auto = search(model, device, job, &discrete_configs(model, device), budget);
        if auto.is_some() {
            out.push(format!(
                "The preset {} does not fit, but the auto plan does: use preset auto.",
                preset.name()
            ));
            return out;
        }
    }
    let ram_short = device.ram_bytes > 0 && least.ram_needed > device.ram_bytes;
    if device.ram_bytes > 0 && !ram_short {
        // Would it fit this budget with RAM to spare?
        let unlimited = DeviceProfile {
            ram_bytes: 0,
            ..device.clone()
        };
        if let Some(e) = search(
            model,
            &unlimited,
            job,
            &discrete_configs(model, device),
            budget,
        ) {
            out.push(format!(
                "With more system RAM it would fit this budget: that plan holds {} in RAM and there is {}.",
                gib(e.ram_needed),
                gib(device.ram_bytes)
            ));
        }
    }
    if min_budget > budget || !ram_short {
        let phase = if min_budget == least.peak {
            String::new()
        } else if min_budget == least.encode_min {
            format!(
                " ({} to stream the text encoder while encoding)",
                gib(min_budget)
            )
        } else {
            format!(" ({} to decode with the VAE in tiles)", gib(min_budget))
        };
        out.push(format!(
            "The smallest achievable peak is {} while sampling{phase}: a budget of at least {} would fit.",
            gib(least.peak),
            gib(min_budget)
        ));
    }
    if ram_short {
        out.push(format!(
            "System RAM is short: the leanest plan holds {} in RAM and there is {}.",
            gib(least.ram_needed),
            gib(device.ram_bytes)
        ));
    }
    if min_budget > budget {
        if let Some(text) = smaller_job(model, device, job, budget) {
            out.push(text);
        }
    }
    out
}

/// The largest job of the same shape that fits `budget`: fewer frames for video, then a smaller size.
fn smaller_job(
    model: &ModelProfile,
    device: &DeviceProfile,
    job: &Job,
    budget: u64,
) -> Option<String> {
    let configs = discrete_configs(model, device);
    let fits = |j: &Job| search(model, device, j, &configs, budget).is_some();
    let t = model.arch.latent_temporal;
    if t > 1 && job.frames > 1 {
        let mut latent = job.latent_frames(model);
        while latent > 1 {
            latent -= 1;
            let frames = (latent - 1) * t + 1;
            if fits(&Job {
                frames,
                ..job.clone()
            }) {
                return Some(format!(
                    "At {}x{} it fits with {frames} frames.",
                    job.width, job.height
                ));
            }
        }
    }
    let step = model.arch.latent_spatial * model.arch.patch;
    for k in (1..16u64).rev() {
        let w = (job.width * k / 16 / step).max(1) * step;
        let h = (job.height * k / 16 / step).max(1) * step;
        if w >= job.width && h >= job.height {
            continue;
        }
        if fits(&Job {
            width: w,
            height: h,
            ..job.clone()
        }) {
            return Some(format!(
                "A smaller job fits: {w}x{h}{}.",
                if job.frames > 1 {
                    format!(" with {} frames", job.frames)
                } else {
                    String::new()
                }
            ));
        }
    }
    None
}

/// `config` with `rung` taken out (the other rungs, and the resident bytes, as they were).
pub fn without_rung(config: &Config, rung: Rung) -> Config {
    let mut c = *config;
    match rung {
        Rung::SixteenBit => c.sixteen_bit = false,
        Rung::EfficientAttention | Rung::AttentionSlicing => c.attention = AttentionMode::Default,
        Rung::OffloadTextEncoder => c.offload_text_encoder = false,
        Rung::OffloadVae => c.offload_vae = false,
        Rung::EightBit => c.eight_bit = false,
        Rung::LayerStreaming => c.resident = None,
    }
    c
}
