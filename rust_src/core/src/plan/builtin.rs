//! Built-in model profiles, so that planning works with neither weights nor a GPU.
//!
//! Block sizes (bf16) were counted from ComfyUI 0.29's own model classes built on the meta device
//! (shared/research/platform-2026-11.md §5a); ComfyUI's `memory_usage_factor` comes from
//! `comfy/supported_models.py`. Text encoders from their standard configs: T5-XXL encoder 4.76 B
//! parameters (~9.5 GB fp16), umT5-XXL ~11.4 GB, CLIP-L 123 M, CLIP-G 695 M; the LLM encoders (Qwen2.5-VL
//! 7B, LLaVA-Llama-3 8B, Mistral-Small 24B) at 16-bit. The 8-bit byte counts assume ComfyUI's native
//! layouts: every linear weight one byte per element (a float32 scale per tensor for fp8, per output row
//! for int8), everything else 16-bit. The activation and FLOP constants are first-principles estimates,
//! meant to be calibrated by a measured run.

use super::profile::{Arch, Block, Component, Family, Format, FormatBytes, ModelProfile, MIB};

/// One row of the table: `count` blocks named `prefix.i` of `mib` MiB (bf16) each, whose largest layer
/// has `largest` parameters.
struct Group {
    prefix: &'static str,
    count: usize,
    mib: f64,
    largest: u64,
}

struct Entry {
    name: &'static str,
    description: &'static str,
    groups: &'static [Group],
    /// Fraction of parameters in linear weights (quantized by the 8-bit rung) and their typical input
    /// width (for the number of per-row scales).
    linear_fraction: f64,
    row_width: u64,
    text_encoders: &'static [(&'static str, f64)],
    vae: (&'static str, f64),
    arch: fn() -> Arch,
}

const M: u64 = 1_000_000;
const KL_DECODE: u64 = 2178 * 64;
const VIDEO_DECODE: u64 = 2800 * 64;

fn dit(
    factor: f64,
    (channels, spatial, temporal): (u64, u64, u64),
    joint_text_tokens: u64,
    (hidden, widest, heads, layers): (u64, u64, u64, u64),
    cfg: bool,
    (vae_bpp, vae_frames): (u64, u64),
) -> Arch {
    Arch {
        family: Family::Dit,
        memory_usage_factor: factor,
        latent_channels: channels,
        latent_spatial: spatial,
        latent_temporal: temporal,
        patch: if spatial == 16 && channels == 128 {
            1
        } else {
            2
        },
        joint_text_tokens,
        hidden,
        widest,
        activation_factor: 3.0,
        heads,
        attention_layers: layers,
        flops_per_token: 0.0,
        cfg,
        vae_decode_bytes_per_pixel: vae_bpp,
        vae_decode_frames: vae_frames,
        comfy_vae_decode_per_latent: if temporal > 1 {
            VIDEO_DECODE
        } else {
            KL_DECODE
        },
    }
}

const FLUX_DEV: Entry = Entry {
    name: "flux-dev",
    description: "FLUX.1-dev (12 B DiT, 19 double + 38 single blocks; guidance-distilled, no CFG)",
    groups: &[
        Group {
            prefix: "double_blocks",
            count: 19,
            mib: 648.2,
            largest: 56_623_104,
        },
        Group {
            prefix: "single_blocks",
            count: 38,
            mib: 270.1,
            largest: 66_060_288,
        },
        Group {
            prefix: "rest",
            count: 1,
            mib: 122.0,
            largest: 18_874_368,
        },
    ],
    linear_fraction: 0.999,
    row_width: 3072,
    text_encoders: &[("t5xxl", 9.52e9), ("clip_l", 0.246e9)],
    vae: ("flux_vae", 0.1676e9),
    arch: || {
        dit(
            3.1,
            (16, 8, 1),
            512,
            (3072, 21504, 24, 57),
            false,
            (1024, 1),
        )
    },
};

const FLUX2_DEV: Entry = Entry {
    name: "flux2-dev",
    description: "FLUX.2-dev (32 B DiT, 8 double + 48 single blocks; guidance-distilled, no CFG)",
    groups: &[
        Group {
            prefix: "double_blocks",
            count: 8,
            mib: 1872.0,
            largest: 226_492_416,
        },
        Group {
            prefix: "single_blocks",
            count: 48,
            mib: 936.0,
            largest: 339_738_624,
        },
        Group {
            prefix: "rest",
            count: 1,
            mib: 1557.0,
            largest: 226_492_416,
        },
    ],
    linear_fraction: 0.999,
    row_width: 6144,
    text_encoders: &[("mistral_3_small", 48.0e9)],
    vae: ("flux2_vae", 0.168e9),
    arch: || {
        dit(
            3.1 * 4.0 * 6144.0 / 2604.0,
            (128, 16, 1),
            512,
            (6144, 55296, 48, 56),
            false,
            (1024, 1),
        )
    },
};

const QWEN_IMAGE: Entry = Entry {
    name: "qwen-image",
    description: "Qwen-Image (20 B DiT, 60 blocks; true CFG)",
    groups: &[
        Group {
            prefix: "transformer_blocks",
            count: 60,
            mib: 648.2,
            largest: 56_623_104,
        },
        Group {
            prefix: "rest",
            count: 1,
            mib: 77.0,
            largest: 11_010_048,
        },
    ],
    linear_fraction: 0.999,
    row_width: 3072,
    text_encoders: &[("qwen_2.5_vl_7b", 16.58e9)],
    vae: ("wan_2.1_vae", 0.254e9),
    arch: || dit(1.8, (16, 8, 1), 256, (3072, 12288, 24, 60), true, (1024, 1)),
};

const WAN21_14B: Entry = Entry {
    name: "wan2.1-14b",
    description: "Wan 2.1 / 2.2 14B T2V (40 blocks, one expert; CFG)",
    groups: &[
        Group {
            prefix: "blocks",
            count: 40,
            mib: 670.2,
            largest: 70_778_880,
        },
        Group {
            prefix: "rest",
            count: 1,
            mib: 444.0,
            largest: 157_286_400,
        },
    ],
    linear_fraction: 0.999,
    row_width: 5120,
    text_encoders: &[("umt5_xxl", 11.4e9)],
    vae: ("wan_2.1_vae", 0.254e9),
    arch: || {
        dit(
            5120.0 / 2222.0,
            (16, 8, 4),
            0,
            (5120, 13824, 40, 40),
            true,
            (1152, 4),
        )
    },
};

const WAN22_5B: Entry = Entry {
    name: "wan2.2-5b",
    description: "Wan 2.2 TI2V 5B (30 blocks, 16x16 VAE; CFG)",
    groups: &[
        Group {
            prefix: "blocks",
            count: 30,
            mib: 312.2,
            largest: 44_040_192,
        },
        Group {
            prefix: "rest",
            count: 1,
            mib: 172.0,
            largest: 56_623_104,
        },
    ],
    linear_fraction: 0.999,
    row_width: 3072,
    text_encoders: &[("umt5_xxl", 11.4e9)],
    vae: ("wan2.2_vae", 1.41e9),
    arch: || {
        dit(
            3072.0 / 2222.0,
            (48, 16, 4),
            0,
            (3072, 14336, 24, 30),
            true,
            (1536, 4),
        )
    },
};

const WAN21_1_3B: Entry = Entry {
    name: "wan2.1-1.3b",
    description: "Wan 2.1 T2V 1.3B (30 blocks; CFG)",
    groups: &[
        Group {
            prefix: "blocks",
            count: 30,
            mib: 88.6,
            largest: 13_762_560,
        },
        Group {
            prefix: "rest",
            count: 1,
            mib: 49.0,
            largest: 14_155_776,
        },
    ],
    linear_fraction: 0.999,
    row_width: 1536,
    text_encoders: &[("umt5_xxl", 11.4e9)],
    vae: ("wan_2.1_vae", 0.254e9),
    arch: || {
        dit(
            1536.0 / 2222.0,
            (16, 8, 4),
            0,
            (1536, 8960, 12, 30),
            true,
            (1152, 4),
        )
    },
};

const HUNYUAN_VIDEO: Entry = Entry {
    name: "hunyuanvideo",
    description:
        "HunyuanVideo (13 B DiT, 20 double + 40 single blocks; guidance-distilled, no CFG)",
    groups: &[
        Group {
            prefix: "double_blocks",
            count: 20,
            mib: 648.2,
            largest: 56_623_104,
        },
        Group {
            prefix: "single_blocks",
            count: 40,
            mib: 270.1,
            largest: 66_060_288,
        },
        Group {
            prefix: "rest",
            count: 1,
            mib: 688.0,
            largest: 25_165_824,
        },
    ],
    linear_fraction: 0.999,
    row_width: 3072,
    text_encoders: &[("llava_llama3_8b", 16.06e9), ("clip_l", 0.246e9)],
    vae: ("hunyuan_video_vae", 0.493e9),
    arch: || {
        dit(
            1.8,
            (16, 8, 4),
            256,
            (3072, 21504, 24, 60),
            false,
            (1152, 4),
        )
    },
};

fn unet(
    factor: f64,
    patch: u64,
    hidden: u64,
    heads: u64,
    layers: u64,
    flops_per_token: f64,
) -> Arch {
    Arch {
        family: Family::Unet,
        memory_usage_factor: factor,
        latent_channels: 4,
        latent_spatial: 8,
        latent_temporal: 1,
        patch,
        joint_text_tokens: 0,
        hidden,
        // The GEGLU projection of the first transformer level: 2 x 4 x hidden.
        widest: 8 * hidden,
        // Four widest-sized tensors live: the block's own plus the skip connections held for the decoder.
        activation_factor: 4.0,
        heads,
        attention_layers: layers,
        flops_per_token,
        cfg: true,
        vae_decode_bytes_per_pixel: 1024,
        vae_decode_frames: 1,
        comfy_vae_decode_per_latent: KL_DECODE,
    }
}

/// A 3x3 convolution at 1280 channels: the largest layer of the SD UNets.
const UNET_LARGEST: u64 = 14_745_600;

const SD15: Entry = Entry {
    name: "sd1.5",
    description: "Stable Diffusion 1.5 (0.86 B UNet; CFG)",
    groups: &[
        Group {
            prefix: "input_blocks.0",
            count: 1,
            mib: 0.02,
            largest: 11_520,
        },
        Group {
            prefix: "input_blocks.1",
            count: 1,
            mib: 9.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.2",
            count: 1,
            mib: 9.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.3",
            count: 1,
            mib: 2.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.4",
            count: 1,
            mib: 30.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.5",
            count: 1,
            mib: 33.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.6",
            count: 1,
            mib: 7.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.7",
            count: 1,
            mib: 113.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.8",
            count: 1,
            mib: 126.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.9",
            count: 1,
            mib: 28.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.10",
            count: 1,
            mib: 59.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.11",
            count: 1,
            mib: 59.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "middle_block",
            count: 1,
            mib: 185.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.0",
            count: 1,
            mib: 94.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.1",
            count: 1,
            mib: 94.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.2",
            count: 1,
            mib: 122.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.3",
            count: 1,
            mib: 160.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.4",
            count: 1,
            mib: 160.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.5",
            count: 1,
            mib: 173.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.6",
            count: 1,
            mib: 50.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.7",
            count: 1,
            mib: 42.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.8",
            count: 1,
            mib: 45.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.9",
            count: 1,
            mib: 13.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.10",
            count: 1,
            mib: 11.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.11",
            count: 1,
            mib: 11.0,
            largest: UNET_LARGEST,
        },
    ],
    linear_fraction: 0.3,
    row_width: 640,
    text_encoders: &[("clip_l", 0.246e9)],
    vae: ("sd_vae", 0.1673e9),
    arch: || unet(1.0, 1, 320, 8, 5, 1.95e8),
};

const SDXL: Entry = Entry {
    name: "sdxl",
    description: "Stable Diffusion XL (2.6 B UNet; CFG)",
    groups: &[
        Group {
            prefix: "input_blocks.0",
            count: 1,
            mib: 0.02,
            largest: 11_520,
        },
        Group {
            prefix: "input_blocks.1",
            count: 1,
            mib: 4.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.2",
            count: 1,
            mib: 4.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.3",
            count: 1,
            mib: 2.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.4",
            count: 1,
            mib: 52.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.5",
            count: 1,
            mib: 55.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.6",
            count: 1,
            mib: 7.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.7",
            count: 1,
            mib: 716.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "input_blocks.8",
            count: 1,
            mib: 729.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "middle_block",
            count: 1,
            mib: 788.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.0",
            count: 1,
            mib: 763.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.1",
            count: 1,
            mib: 763.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.2",
            count: 1,
            mib: 775.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.3",
            count: 1,
            mib: 72.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.4",
            count: 1,
            mib: 64.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.5",
            count: 1,
            mib: 67.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.6",
            count: 1,
            mib: 8.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.7",
            count: 1,
            mib: 6.0,
            largest: UNET_LARGEST,
        },
        Group {
            prefix: "output_blocks.8",
            count: 1,
            mib: 6.0,
            largest: UNET_LARGEST,
        },
    ],
    linear_fraction: 0.55,
    row_width: 1280,
    text_encoders: &[("clip_l", 0.246e9), ("clip_g", 1.39e9)],
    vae: ("sdxl_vae", 0.1673e9),
    arch: || unet(0.8, 2, 640, 10, 10, 1.34e9),
};

const ENTRIES: [&Entry; 9] = [
    &SD15,
    &SDXL,
    &FLUX_DEV,
    &FLUX2_DEV,
    &QWEN_IMAGE,
    &WAN21_14B,
    &WAN22_5B,
    &WAN21_1_3B,
    &HUNYUAN_VIDEO,
];

fn build(e: &Entry) -> ModelProfile {
    let mut blocks = Vec::new();
    for g in e.groups {
        let params = (g.mib * MIB as f64 / 2.0).round() as u64;
        let quantizable = (params as f64 * e.linear_fraction) as u64;
        // Per-tensor fp8 scales: about one linear per 10 M parameters; per-row int8 scales: one per row.
        let tensors = params / (10 * M) + 1;
        let rows = quantizable / e.row_width;
        for i in 0..g.count {
            let name = if g.count == 1 {
                g.prefix.to_string()
            } else {
                format!("{}.{i}", g.prefix)
            };
            blocks.push(Block {
                name,
                bytes: FormatBytes::from_params(params, quantizable, tensors, rows),
                largest_layer_params: g.largest.min(params),
            });
        }
    }
    ModelProfile {
        name: e.name.to_string(),
        weights_format: Format::Bf16,
        blocks,
        text_encoders: e
            .text_encoders
            .iter()
            .map(|&(name, bytes)| Component {
                name: name.to_string(),
                bytes: bytes as u64,
            })
            .collect(),
        vae: Some(Component {
            name: e.vae.0.to_string(),
            bytes: e.vae.1 as u64,
        }),
        arch: (e.arch)(),
    }
}

/// The names of the built-in profiles with a one-line description each, in a fixed order.
pub fn names() -> Vec<(&'static str, &'static str)> {
    ENTRIES.iter().map(|e| (e.name, e.description)).collect()
}

/// The built-in profile called `name`, if any.
pub fn profile(name: &str) -> Option<ModelProfile> {
    ENTRIES.iter().find(|e| e.name == name).map(|e| build(e))
}

/// Every built-in profile, in `names()` order.
pub fn profiles() -> Vec<ModelProfile> {
    ENTRIES.iter().map(|e| build(e)).collect()
}
