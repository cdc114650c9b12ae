//! The engines: the GEMM micro-kernels and softmax loops the kernel runs on, one set per instruction set.
//!
//! All engines share the driver (`kernel.rs`) and the packed layouts below; they differ in the element
//! they multiply (f32, or bf16 pairs for `vdpbf16ps`) and in how the loops are written:
//! - `Portable`: plain Rust loops over 16-lane arrays, compiled twice (AVX2+FMA when the CPU has it, and
//!   baseline): the fallback for every CPU.
//! - `Avx512`: hand-written AVX-512F micro-kernels (6 x 64 register tiles) and softmax with `vscalefps`.
//! - `Avx512Bf16`: for bf16 inputs: `vdpbf16ps` dot products (two bf16 products per f32 lane, exact
//!   products, f32 sums) for both GEMMs; probabilities are rounded to bf16 for the P V product, as torch's
//!   bf16 flash kernel and ComfyUI's attention do.
//!
//! Why hand-written micro-kernels (measured on the 2-core Zen 5 this was written on, one thread):
//! - register-only loops peak at 133 GFLOP/s of f32 FMA with 256-bit vectors, 265 with 512-bit ones and
//!   490 with `vdpbf16ps`;
//! - on 128 x 512 attention blocks (`tests.rs: gemm_speed`, D = 64), the `Avx512` GEMMs run at 262 (Q K^T)
//!   and 260 (P V) GFLOP/s, faer 0.24 (`Par::Seq`, which picks AVX-512 at run time) at 247 and 251, the
//!   `Avx512Bf16` ones at 518 and 511, and the portable ones at 128 and 121;
//! - so they match faer in f32, double it in bf16 (faer has no bf16 dot products), cost no dependency, and
//!   K and V are packed once per head for every query block instead of once per GEMM call.
//!
//! End to end on both cores at 4096 tokens, 8 heads, D = 64 (`_core.attention`, quiet machine): `Avx512`
//! engine 411 GFLOP/s and `Avx512Bf16` 660, against torch SDPA's 182 (f32) and 175 (bf16); portable 164.

/// Instantiates `$tile::<R, ...>` for the `rows - r0` rows left (at most `MR`, the row-tile height of the
/// engine that expands it). Defined before the engine modules so that every engine can use it.
macro_rules! by_rows {
    ($left:expr, $tile:ident [$($c:tt),*] ($($arg:expr),*)) => {
        match $left {
            1 => $tile::<1, $($c),*>($($arg),*),
            2 => $tile::<2, $($c),*>($($arg),*),
            3 => $tile::<3, $($c),*>($($arg),*),
            4 => $tile::<4, $($c),*>($($arg),*),
            5 => $tile::<5, $($c),*>($($arg),*),
            _ => $tile::<MR, $($c),*>($($arg),*),
        }
    };
}

pub(super) mod avx512;
pub(super) mod pack;
pub(super) mod portable;

use super::type_err;
use crate::error::CoreResult;
use crate::quant::{Element, FloatType};

/// Keys per packed K panel (and per V panel): four 16-lane vectors.
pub const PANEL: usize = 64;

/// Which micro-kernels run the attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Engine {
    Portable,
    Avx512,
    Avx512Bf16,
}

/// Element counts of the packed buffers for given head dims.
#[derive(Debug, Clone, Copy)]
pub struct LayoutSizes {
    /// Elements of one row of the query block.
    pub q_row: usize,
    /// Elements of one K panel of `PANEL` keys, and of one V panel.
    pub k_panel: usize,
    pub v_panel: usize,
    /// `v_head_dim` rounded up to a whole number of 16-lane vectors.
    pub dv_pad: usize,
    /// Bytes of a packed element, and of a probability (0 when probabilities overwrite the scores).
    pub elem_bytes: usize,
    pub p_bytes: usize,
}

impl Engine {
    pub const NAMES: [&'static str; 3] = ["portable", "avx512", "avx512-bf16"];
    const ALL: [Engine; 3] = [Engine::Portable, Engine::Avx512, Engine::Avx512Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx512 => "avx512",
            Self::Avx512Bf16 => "avx512-bf16",
        }
    }

    /// `"auto"` is `None`: let the kernel pick.
    pub fn parse(name: &str) -> CoreResult<Option<Self>> {
        if name == "auto" {
            return Ok(None);
        }
        Self::ALL
            .into_iter()
            .find(|e| e.name() == name)
            .map(Some)
            .ok_or_else(|| {
                crate::value_err!(
                    "unknown attention engine {name:?}; accepted: auto, {}",
                    Self::NAMES.join(", ")
                )
            })
    }

    /// Whether this CPU can run the engine.
    pub fn is_supported(self) -> bool {
        match self {
            Self::Portable => true,
            Self::Avx512 => avx512::F32::detect().is_some(),
            Self::Avx512Bf16 => avx512::Bf16::detect().is_some(),
        }
    }

    /// The engines this CPU can run.
    pub fn supported() -> Vec<Engine> {
        Self::ALL.into_iter().filter(|e| e.is_supported()).collect()
    }

    /// The fastest engine for inputs of type `T` on this CPU.
    pub fn auto<T: Element>() -> Self {
        Self::for_type(T::TYPE)
    }

    /// The engine the kernel runs for inputs of type `t` on this CPU (what `auto` picks; `VRAMKIT_SIMD`
    /// caps it: below `avx512` only the portable engine remains).
    pub fn for_type(t: FloatType) -> Self {
        if t == FloatType::Bf16 && Self::Avx512Bf16.is_supported() {
            Self::Avx512Bf16
        } else if Self::Avx512.is_supported() {
            Self::Avx512
        } else {
            Self::Portable
        }
    }

    /// An error unless the engine runs on this CPU and takes inputs of type `T`.
    pub fn check_usable<T: Element>(self) -> CoreResult<()> {
        if !self.is_supported() {
            return Err(crate::value_err!(
                "attention engine {:?} needs instructions this CPU lacks; supported here: {}",
                self.name(),
                Self::supported()
                    .iter()
                    .map(|e| e.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if self == Self::Avx512Bf16 && T::TYPE != FloatType::Bf16 {
            return Err(type_err(format!(
                "attention engine \"avx512-bf16\" takes bfloat16 inputs only; got {}",
                T::NAME
            )));
        }
        Ok(())
    }

    /// Buffer sizes of this engine's packed layouts. Sizes saturate at `usize::MAX` (for the planner, which
    /// is asked about any sizes; the kernel's come from arrays in memory, far from it).
    pub fn layout_sizes(self, d: usize, dv: usize) -> LayoutSizes {
        let up = |n: usize, m: usize| n.checked_next_multiple_of(m).unwrap_or(usize::MAX);
        let dv_pad = up(dv, 16);
        match self {
            Self::Portable | Self::Avx512 => LayoutSizes {
                q_row: d,
                k_panel: PANEL.saturating_mul(d),
                v_panel: PANEL.saturating_mul(dv_pad),
                dv_pad,
                elem_bytes: 4,
                p_bytes: 0,
            },
            Self::Avx512Bf16 => LayoutSizes {
                q_row: up(d, 2),
                k_panel: PANEL.saturating_mul(up(d, 2)),
                v_panel: PANEL.saturating_mul(dv_pad),
                dv_pad,
                elem_bytes: 2,
                p_bytes: 2,
            },
        }
    }
}

/// The operations the driver needs from an engine. Implementations exist only once their instructions
/// have been detected (`detect`), so every method is safe to call.
///
/// Shapes: a query block is `rows` rows of `q_row` elements; K is packed in panels of `PANEL` keys
/// (`pack::k_panel_*`), V in panels of `PANEL` keys of `dv_pad` elements (`pack::v_panel_*`); scores are
/// f32 rows of `lds` elements, probabilities rows of `ldp` elements of `Self::P`.
pub(super) trait Micro: Copy + Send + Sync {
    /// Element of the query block and of packed K and V.
    type E: bytemuck::Pod + Send + Sync;
    /// Element of the probabilities.
    type P: bytemuck::Pod + Send + Sync;
    /// True when probabilities go to their own buffer; false when they overwrite the scores in place
    /// (then `P` is f32 and the driver reads them from the score buffer).
    const SEPARATE_P: bool;
    const ENGINE: Engine;

    /// One query row of `d` inputs into `dst` (`q_row` elements, zero padded).
    fn load_q<T: Element>(self, src: &[T], dst: &mut [Self::E]);
    /// Packs keys `rows[0..]` (at most `PANEL`, each of `d` elements) into one K panel, zero padded.
    fn pack_k<'a, T: Element>(
        self,
        key: impl Fn(usize) -> &'a [T],
        n: usize,
        d: usize,
        dst: &mut [Self::E],
    );
    /// Packs values (at most `PANEL`, each of `dv` elements) into one V panel, zero padded.
    fn pack_v<'a, T: Element>(
        self,
        value: impl Fn(usize) -> &'a [T],
        n: usize,
        dv: usize,
        dst: &mut [Self::E],
    );
    /// `s[r][0 .. 64 * panels] = q[r] . k_j` for `r < rows`.
    #[allow(clippy::too_many_arguments)]
    fn qk(
        self,
        q: &[Self::E],
        ldq: usize,
        rows: usize,
        d: usize,
        k: &[Self::E],
        panels: usize,
        s: &mut [f32],
        lds: usize,
    );
    /// The largest of `s` (NaN-ignoring unless all are NaN; -inf for an empty slice).
    fn row_max(self, s: &[f32]) -> f32;
    /// `p[j] = 2^(s[j] * c - sub)` for `j < n`, `p[j] = 0` for `n <= j < n_pad`; returns the sum of the
    /// `p[j]` as stored. Writes `s` in place when `SEPARATE_P` is false (then `p` is empty).
    fn exp_row(
        self,
        s: &mut [f32],
        n: usize,
        n_pad: usize,
        c: f32,
        sub: f32,
        p: &mut [Self::P],
    ) -> f32;
    /// `o[r] = o[r] * corr[r] + sum_j p[r][j] v[j]` for `r < rows` over `keys` keys (a multiple of `PANEL`).
    #[allow(clippy::too_many_arguments)]
    fn pv(
        self,
        p: &[Self::P],
        ldp: usize,
        rows: usize,
        keys: usize,
        v: &[Self::E],
        dv_pad: usize,
        o: &mut [f32],
        corr: &[f32],
    );
}
