//! The fit planner's fixed cases and properties.

use super::builtin;
use super::cost::{evaluate, AttentionMode, Config};
use super::ladder::{discrete_configs, plan_fit, without_rung, Plan, Preset, Rung};
use super::profile::{
    Arch, Block, Component, DeviceProfile, Estimate, Family, Format, FormatBytes, Job,
    MemoryManager, ModelProfile, Os, GIB, MIB,
};
use proptest::prelude::*;

fn flux(gb: u64) -> Plan {
    let m = builtin::profile("flux-dev").unwrap();
    let d = DeviceProfile::reference(gb * GIB);
    plan_fit(&m, &d, &Job::image(1024, 1024), gb * GIB, Preset::Auto).unwrap()
}

fn rungs(p: &Plan) -> Vec<Rung> {
    p.steps.iter().map(|s| s.rung).collect()
}

#[test]
fn flux_dev_at_48_gb_applies_nothing() {
    let p = flux(48);
    assert!(p.fits);
    assert!(p.steps.is_empty(), "{:?}", p.steps);
    assert_eq!(p.evaluation.config, Config::NOTHING);
    assert!(p.evaluation.peak <= 48 * GIB);
}

#[test]
fn flux_dev_climbs_the_ladder_as_memory_shrinks() {
    use Rung::*;
    let expected: [(u64, &[Rung]); 5] = [
        (24, &[OffloadTextEncoder]),
        (16, &[OffloadTextEncoder, EightBit]),
        (
            12,
            &[OffloadTextEncoder, OffloadVae, EightBit, LayerStreaming],
        ),
        (
            8,
            &[OffloadTextEncoder, OffloadVae, EightBit, LayerStreaming],
        ),
        (
            6,
            &[OffloadTextEncoder, OffloadVae, EightBit, LayerStreaming],
        ),
    ];
    let mut last_time = 0.0;
    let mut last_resident = u64::MAX;
    for (gb, want) in expected {
        let p = flux(gb);
        assert!(p.fits, "{gb} GB");
        assert_eq!(rungs(&p), want, "{gb} GB");
        assert!(p.evaluation.peak <= gb * GIB, "{gb} GB");
        assert_eq!(p.evaluation.peak, p.evaluation.components.total());
        for s in &p.steps {
            assert!(!s.action.is_empty() && s.reason.ends_with('.'), "{s:?}");
        }
        // Less memory: slower steps, fewer resident weights.
        assert!(p.evaluation.time.total >= last_time, "{gb} GB");
        assert!(p.evaluation.components.weights <= last_resident, "{gb} GB");
        last_time = p.evaluation.time.total;
        last_resident = p.evaluation.components.weights;
    }
}

#[test]
fn each_flux_plan_is_the_cheapest_rung_set_that_fits() {
    // No configuration using only rungs earlier on the ladder (or a strict subset) fits any of the budgets.
    let m = builtin::profile("flux-dev").unwrap();
    for gb in [24u64, 16, 12, 8, 6] {
        let d = DeviceProfile::reference(gb * GIB);
        let job = Job::image(1024, 1024);
        let p = flux(gb);
        let chosen = rungs(&p);
        for c in discrete_configs(&m, &d) {
            let e = evaluate(&m, &d, &job, &c);
            let applied = super::ladder::rungs_of(&m, &d, &e);
            let subset = applied.iter().all(|r| chosen.contains(r)) && applied.len() < chosen.len();
            if subset {
                assert!(!e.fits(gb * GIB, 0), "{gb} GB: {applied:?} fits too");
            }
        }
    }
}

#[test]
fn below_any_achievable_peak_it_says_so() {
    let p = flux(1);
    assert!(!p.fits);
    assert!(p.min_budget > GIB);
    assert!(p.evaluation.peak > 0 && p.evaluation.peak <= p.min_budget);
    assert!(
        p.suggestions
            .iter()
            .any(|s| s.contains("smallest achievable peak")),
        "{:?}",
        p.suggestions
    );
    // Exactly at the least budget it fits.
    let m = builtin::profile("flux-dev").unwrap();
    let d = DeviceProfile::reference(p.min_budget);
    let at = plan_fit(&m, &d, &Job::image(1024, 1024), p.min_budget, Preset::Auto).unwrap();
    assert!(at.fits);
    let d = DeviceProfile::reference(p.min_budget - 1);
    let below = plan_fit(
        &m,
        &d,
        &Job::image(1024, 1024),
        p.min_budget - 1,
        Preset::Auto,
    )
    .unwrap();
    assert!(!below.fits);
}

#[test]
fn sd15_at_4_gb_512_applies_nothing() {
    let m = builtin::profile("sd1.5").unwrap();
    let d = DeviceProfile::reference(4 * GIB);
    let p = plan_fit(&m, &d, &Job::image(512, 512), 4 * GIB, Preset::Auto).unwrap();
    assert!(p.fits);
    assert!(p.steps.is_empty(), "{:?}", p.steps);
}

#[test]
fn builtin_profiles_have_the_real_block_sizes() {
    let names: Vec<&str> = builtin::names().iter().map(|(n, _)| *n).collect();
    for want in [
        "sd1.5",
        "sdxl",
        "flux-dev",
        "flux2-dev",
        "qwen-image",
        "wan2.1-14b",
        "wan2.2-5b",
        "wan2.1-1.3b",
        "hunyuanvideo",
    ] {
        assert!(names.contains(&want), "{want}");
    }
    let gib =
        |name: &str| builtin::profile(name).unwrap().weight_bytes(Format::Bf16) as f64 / GIB as f64;
    for (name, total) in [
        ("flux-dev", 22.17),
        ("flux2-dev", 60.02),
        ("qwen-image", 38.05),
        ("wan2.1-14b", 26.61),
        ("wan2.2-5b", 9.31),
        ("wan2.1-1.3b", 2.64),
        ("hunyuanvideo", 23.88),
        ("sdxl", 4.78),
        ("sd1.5", 1.60),
    ] {
        assert!(
            (gib(name) - total).abs() < 0.02,
            "{name}: {} GiB",
            gib(name)
        );
    }
    let flux = builtin::profile("flux-dev").unwrap();
    assert_eq!(
        flux.blocks
            .iter()
            .filter(|b| b.name.starts_with("double_blocks."))
            .count(),
        19
    );
    assert_eq!(
        flux.blocks
            .iter()
            .filter(|b| b.name.starts_with("single_blocks."))
            .count(),
        38
    );
    assert!((flux.blocks[0].bytes.bf16 as f64 - 648.2 * MIB as f64).abs() <= 2.0);
    assert!((flux.arch.memory_usage_factor - 3.1).abs() < 1e-9);
    // 8-bit: about half, scales included.
    let ratio = flux.weight_bytes(Format::Fp8) as f64 / flux.weight_bytes(Format::Bf16) as f64;
    assert!((0.5..0.51).contains(&ratio), "{ratio}");
    assert!(flux.weight_bytes(Format::Int8) > flux.weight_bytes(Format::Fp8));
    let t5 = &flux.text_encoders[0];
    assert!((t5.bytes as f64 - 9.5e9).abs() < 0.1e9);
    assert!(
        (builtin::profile("wan2.1-14b")
            .unwrap()
            .arch
            .memory_usage_factor
            - 2.304)
            .abs()
            < 1e-3
    );
}

#[test]
fn comfy_estimate_matches_comfyui_formula() {
    // ComfyUI 0.29's memory_required for Flux.1 at 1024^2, batch 1 (x2 for CFG), bf16: 2,032 MiB;
    // Wan 14B at 832x480x81: 12,078 MiB (shared/research/platform-2026-11.md §1e).
    let flux = builtin::profile("flux-dev").unwrap();
    let a = super::cost::activations(&flux, &Job::image(1024, 1024), 2, true);
    assert_eq!(a.comfy / MIB, 2031);
    assert_eq!(a.comfy_minimum / MIB, 1015);
    assert_eq!(a.comfy_dynamic, (a.comfy as f64 * 1.3).ceil() as u64 + GIB);
    let wan = builtin::profile("wan2.1-14b").unwrap();
    let job = Job {
        frames: 81,
        ..Job::image(832, 480)
    };
    let a = super::cost::activations(&wan, &job, 2, true);
    assert!((a.comfy / MIB) as i64 - 12078 <= 1, "{}", a.comfy / MIB);
    assert_eq!(a.tokens, 21 * 30 * 52);
    // First principles for Flux: 4608 tokens x 21504 x 2 bytes x 3, no CFG.
    let a = super::cost::activations(&flux, &Job::image(1024, 1024), 2, true);
    assert_eq!(a.first_principles, 4608 * 21504 * 2 * 3);
}

#[test]
fn reserve_follows_comfyui() {
    let mut d = DeviceProfile::reference(24 * GIB);
    assert_eq!(d.minimum_inference(), GIB * 8 / 10 + 400 * MIB);
    d.os = Os::Windows;
    assert_eq!(d.extra_reserved(), 700 * MIB);
    d.total_bytes = 8 * GIB;
    assert_eq!(d.extra_reserved(), 600 * MIB);
    // What a running ComfyUI reports wins (--reserve-vram, or a CPU device with no reserve).
    d.extra_reserved_bytes = Some(0);
    d.minimum_inference_bytes = Some(0);
    assert_eq!((d.extra_reserved(), d.minimum_inference()), (0, 0));
}

#[test]
fn windows_shared_memory_never_counts() {
    let m = builtin::profile("flux-dev").unwrap();
    let mut d = DeviceProfile::reference(12 * GIB);
    d.os = Os::Windows;
    let p = plan_fit(&m, &d, &Job::image(1024, 1024), 48 * GIB, Preset::Auto).unwrap();
    assert_eq!(p.budget, 12 * GIB);
    assert!(p.evaluation.peak <= 12 * GIB);
    assert!(
        p.notes.iter().any(|n| n.contains("shared-memory")),
        "{:?}",
        p.notes
    );
}

#[test]
fn too_little_ram_is_not_a_plan() {
    let m = builtin::profile("flux-dev").unwrap();
    let mut d = DeviceProfile::reference(6 * GIB);
    let job = Job::image(1024, 1024);
    d.ram_bytes = 64 * GIB;
    assert!(plan_fit(&m, &d, &job, 6 * GIB, Preset::Auto).unwrap().fits);
    d.ram_bytes = 4 * GIB;
    let p = plan_fit(&m, &d, &job, 6 * GIB, Preset::Auto).unwrap();
    assert!(!p.fits);
    assert!(
        p.suggestions.iter().any(|s| s.contains("RAM")),
        "{:?}",
        p.suggestions
    );
}

#[test]
fn standard_attention_gets_efficient_then_slicing() {
    let m = builtin::profile("sd1.5").unwrap();
    let mut d = DeviceProfile::reference(4 * GIB);
    d.efficient_attention = false;
    let p = plan_fit(&m, &d, &Job::image(512, 512), 4 * GIB, Preset::Auto).unwrap();
    assert!(p.fits);
    assert_eq!(rungs(&p), vec![Rung::EfficientAttention]);
    // Slicing is chosen over the default only when it is the memory that forces it: compare the
    // standard-attention configuration with its sliced variants directly.
    let job = Job::image(1024, 1024);
    let standard = evaluate(&m, &d, &job, &Config::NOTHING);
    let sliced = evaluate(
        &m,
        &d,
        &job,
        &Config {
            attention: AttentionMode::Sliced(8),
            ..Config::NOTHING
        },
    );
    assert!(sliced.components.attention * 7 < standard.components.attention);
    assert!(sliced.time.total > standard.time.total);
}

#[test]
fn presets_fix_the_rungs() {
    let m = builtin::profile("flux-dev").unwrap();
    let d = DeviceProfile::reference(12 * GIB);
    let job = Job::image(1024, 1024);
    let gpu_only = plan_fit(&m, &d, &job, 12 * GIB, Preset::GpuOnly).unwrap();
    assert!(!gpu_only.fits);
    assert!(gpu_only.suggestions.iter().any(|s| s.contains("auto")));
    let med = plan_fit(&m, &d, &job, 12 * GIB, Preset::MedVram).unwrap();
    assert!(med.fits);
    assert!(!rungs(&med).contains(&Rung::EightBit));
    assert!(rungs(&med).contains(&Rung::LayerStreaming));
    let low = plan_fit(&m, &d, &job, 12 * GIB, Preset::LowVram).unwrap();
    assert!(low.fits && low.evaluation.components.weights < med.evaluation.components.weights);
    let no = plan_fit(&m, &d, &job, 12 * GIB, Preset::NoVram).unwrap();
    assert!(no.fits);
    assert_eq!(no.evaluation.components.weights, 0);
    assert!(Preset::parse("ultravram").is_err());
}

#[test]
fn bad_input_names_the_field() {
    let m = builtin::profile("flux-dev").unwrap();
    let d = DeviceProfile::reference(8 * GIB);
    let err = plan_fit(&m, &d, &Job::image(0, 512), GIB, Preset::Auto).unwrap_err();
    assert!(err.to_string().contains("job['width']"), "{err}");
    let err = plan_fit(
        &m,
        &d,
        &Job {
            frames: 9,
            ..Job::image(512, 512)
        },
        GIB,
        Preset::Auto,
    )
    .unwrap_err();
    assert!(err.to_string().contains("job['frames']"), "{err}");
    let mut bad = d.clone();
    bad.h2d_gbps = f64::NAN;
    let err = plan_fit(&m, &bad, &Job::image(512, 512), GIB, Preset::Auto).unwrap_err();
    assert!(err.to_string().contains("h2d_gbps"), "{err}");
}

// ---- properties -------------------------------------------------------------------------------------

fn arb_model() -> impl Strategy<Value = ModelProfile> {
    (
        prop::collection::vec((1u64..2_000, 1u64..400), 1..24),
        prop::sample::select(vec![Format::Bf16, Format::Fp16, Format::Fp32, Format::Fp8]),
        (0u64..20_000, 0u64..2_000),
        prop::bool::ANY,
        (1u64..4, 1u64..3, 0u64..600),
        (0.3f64..4.0, 1.0f64..4.0, prop::bool::ANY),
    )
        .prop_map(
            |(
                blocks,
                fmt,
                (te_mib, vae_mib),
                video,
                (temporal_pick, patch, text),
                (factor, act, cfg),
            )| {
                let temporal = if video { 4 } else { 1 };
                let _ = temporal_pick;
                let blocks = blocks
                    .into_iter()
                    .enumerate()
                    .map(|(i, (mib, largest_mib))| {
                        let params = mib * MIB / 2;
                        Block {
                            name: format!("blocks.{i}"),
                            bytes: FormatBytes::from_params(
                                params,
                                params * 99 / 100,
                                10,
                                params / 3072,
                            ),
                            largest_layer_params: (largest_mib * MIB / 2).min(params),
                        }
                    })
                    .collect();
                ModelProfile {
                    name: "random".into(),
                    weights_format: fmt,
                    blocks,
                    text_encoders: if te_mib > 0 {
                        vec![Component {
                            name: "te".into(),
                            bytes: te_mib * MIB,
                        }]
                    } else {
                        vec![]
                    },
                    vae: (vae_mib > 0).then(|| Component {
                        name: "vae".into(),
                        bytes: vae_mib * MIB,
                    }),
                    arch: Arch {
                        family: if patch == 1 {
                            Family::Unet
                        } else {
                            Family::Dit
                        },
                        memory_usage_factor: factor,
                        latent_channels: 16,
                        latent_spatial: 8,
                        latent_temporal: temporal,
                        patch,
                        joint_text_tokens: text,
                        hidden: 1024,
                        widest: 4096,
                        activation_factor: act,
                        heads: 16,
                        attention_layers: 20,
                        flops_per_token: 0.0,
                        cfg,
                        vae_decode_bytes_per_pixel: 1024,
                        vae_decode_frames: if video { 4 } else { 1 },
                        comfy_vae_decode_per_latent: 2178 * 64,
                    },
                }
            },
        )
}

fn arb_device() -> impl Strategy<Value = DeviceProfile> {
    (
        prop::sample::select(vec![
            (7u32, 0u32),
            (7, 5),
            (8, 0),
            (8, 6),
            (8, 9),
            (9, 0),
            (12, 0),
        ]),
        prop::bool::ANY,
        (1.0f64..64.0, 100.0f64..4000.0, 5.0f64..400.0),
        prop::sample::select(vec![0u64, 8, 16, 32, 64, 256]),
        prop::sample::select(vec![Os::Linux, Os::Windows]),
        prop::bool::ANY,
        0u64..4,
    )
        .prop_map(
            |(cc, efficient, (h2d, mem, tflops), ram_gib, os, dynamic, streams)| {
                let (bf16, fp8_matmul, int8_matmul) = DeviceProfile::capabilities(Some(cc));
                DeviceProfile {
                    name: "random".into(),
                    total_bytes: 256 * GIB,
                    free_bytes: 0,
                    compute_capability: Some(cc),
                    bf16,
                    fp8_matmul,
                    int8_matmul,
                    efficient_attention: efficient,
                    h2d_gbps: h2d,
                    memory_gbps: mem,
                    tflops,
                    ram_bytes: ram_gib * GIB,
                    os,
                    memory_manager: if dynamic {
                        MemoryManager::Dynamic
                    } else {
                        MemoryManager::Legacy
                    },
                    streams,
                    extra_reserved_bytes: None,
                    minimum_inference_bytes: None,
                }
            },
        )
}

fn arb_job(video: bool) -> impl Strategy<Value = Job> {
    (
        1u64..64,
        1u64..64,
        0u64..8,
        1u64..3,
        prop::option::of(prop::bool::ANY),
        prop::bool::ANY,
    )
        .prop_map(move |(w, h, t, batch, cfg, comfy)| Job {
            width: w * 32,
            height: h * 32,
            frames: if video { t * 4 + 1 } else { 1 },
            batch,
            cfg,
            estimate: if comfy {
                Estimate::Comfy
            } else {
                Estimate::FirstPrinciples
            },
            activation_scale: 1.0,
            time_scale: 1.0,
        })
}

fn arb_case() -> impl Strategy<Value = (ModelProfile, DeviceProfile, Job)> {
    (arb_model(), arb_device()).prop_flat_map(|(m, d)| {
        let video = m.arch.latent_temporal > 1;
        (Just(m), Just(d), arb_job(video))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_returned_plan_fits((m, d, job) in arb_case(), budget_mib in 256u64..120_000) {
        let budget = budget_mib * MIB;
        let p = plan_fit(&m, &d, &job, budget, Preset::Auto).unwrap();
        let e = &p.evaluation;
        prop_assert_eq!(e.peak, e.components.total());
        if p.fits {
            prop_assert!(e.peak <= budget);
            prop_assert!(e.encode_min <= budget && e.decode_min <= budget);
            prop_assert!(d.ram_bytes == 0 || e.ram_needed <= d.ram_bytes);
            prop_assert!(p.suggestions.is_empty());
        } else {
            prop_assert!(!p.suggestions.is_empty());
            prop_assert!(p.min_budget > budget || (d.ram_bytes > 0 && e.ram_needed > d.ram_bytes));
        }
    }

    #[test]
    fn more_memory_never_gives_a_slower_plan(
        (m, d, job) in arb_case(), a_mib in 256u64..80_000, extra_mib in 0u64..40_000,
    ) {
        let small = plan_fit(&m, &d, &job, a_mib * MIB, Preset::Auto).unwrap();
        let large = plan_fit(&m, &d, &job, (a_mib + extra_mib) * MIB, Preset::Auto).unwrap();
        if small.fits {
            prop_assert!(large.fits);
            prop_assert!(large.evaluation.time.total <= small.evaluation.time.total,
                "{} > {}", large.evaluation.time.total, small.evaluation.time.total);
        }
    }

    #[test]
    fn every_step_is_needed((m, d, job) in arb_case(), budget_mib in 256u64..120_000) {
        let budget = budget_mib * MIB;
        let p = plan_fit(&m, &d, &job, budget, Preset::Auto).unwrap();
        if p.fits {
            for step in &p.steps {
                let c = without_rung(&p.evaluation.config, step.rung);
                let e = evaluate(&m, &d, &job, &c);
                prop_assert!(
                    !e.fits(budget, d.ram_bytes) || e.time.total > p.evaluation.time.total,
                    "dropping {:?} still fits at {} s vs {} s", step.rung, e.time.total, p.evaluation.time.total
                );
            }
        }
    }

    #[test]
    fn plans_are_deterministic((m, d, job) in arb_case(), budget_mib in 256u64..120_000) {
        let a = plan_fit(&m, &d, &job, budget_mib * MIB, Preset::Auto).unwrap();
        let b = plan_fit(&m, &d, &job, budget_mib * MIB, Preset::Auto).unwrap();
        prop_assert_eq!(a, b);
    }
}
