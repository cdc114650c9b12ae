//! The AVX-512 engines: hand-written micro-kernels with `std::arch`, selected at run time.
//!
//! - `F32`: 6 x 64 register tiles (24 zmm accumulators) for Q K^T over K panels `[d][64]`, and 6 x 64
//!   tiles for P V over value rows; the softmax uses `vscalefps` for 2^n.
//! - `Bf16`: the same tiles with `vdpbf16ps`, which multiplies a broadcast pair of bf16 query (or
//!   probability) elements with 16 pairs of packed bf16 keys (or values) and adds both products into
//!   16 f32 lanes. Products of bf16 are exact in f32, so Q K^T is as accurate as the f32 path on bf16
//!   inputs; the probabilities are rounded to bf16 (nearest even) for P V, and the weight sum `l` adds the
//!   rounded values, so the weights that multiply V are normalized exactly as stored.
//!
//! The tokens `F32` and `Bf16` can only be made by `detect()`, after the CPU has been checked for the
//! instructions; that is what makes calling the `#[target_feature]` functions sound.

use super::{pack, Engine, Micro};
use crate::quant::Element;

#[cfg(target_arch = "x86_64")]
mod x86;

/// AVX-512F engine on f32 (inputs of any float type are converted to f32 when packed).
#[derive(Debug, Clone, Copy)]
pub struct F32(Token);

/// AVX-512 BF16 engine for bf16 inputs.
#[derive(Debug, Clone, Copy)]
pub struct Bf16(Token);

/// Proof that the instructions were detected: a unit value on x86-64, uninhabited elsewhere.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
struct Token(());

#[cfg(not(target_arch = "x86_64"))]
#[derive(Debug, Clone, Copy)]
enum Token {}

impl F32 {
    pub fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx512() {
            return Some(Self(Token(())));
        }
        None
    }
}

impl Bf16 {
    pub fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx512() && std::is_x86_feature_detected!("avx512bf16") {
            return Some(Self(Token(())));
        }
        None
    }
}

/// On other architectures the tokens cannot exist, so these bodies can never run.
#[cfg(not(target_arch = "x86_64"))]
macro_rules! call {
    ($self:ident, $($body:tt)*) => {
        match $self.0 {}
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! call {
    ($self:ident, $($body:tt)*) => {{
        let _ = $self;
        // SAFETY: `$self` exists only if `detect` found the instructions the function is compiled for.
        unsafe { $($body)* }
    }};
}

impl Micro for F32 {
    type E = f32;
    type P = f32;
    const SEPARATE_P: bool = false;
    const ENGINE: Engine = Engine::Avx512;

    fn load_q<T: Element>(self, src: &[T], dst: &mut [f32]) {
        pack::q_row_f32(src, dst);
    }

    fn pack_k<'a, T: Element>(
        self,
        key: impl Fn(usize) -> &'a [T],
        n: usize,
        d: usize,
        dst: &mut [f32],
    ) {
        pack::k_panel_f32(key, n, d, dst);
    }

    fn pack_v<'a, T: Element>(
        self,
        value: impl Fn(usize) -> &'a [T],
        n: usize,
        dv: usize,
        dst: &mut [f32],
    ) {
        pack::v_panel_f32(value, n, dv, dst);
    }

    fn qk(
        self,
        q: &[f32],
        ldq: usize,
        rows: usize,
        d: usize,
        k: &[f32],
        panels: usize,
        s: &mut [f32],
        lds: usize,
    ) {
        x86_check::qk(q.len(), ldq, rows, d, k.len(), panels, s.len(), lds, 1);
        call!(self, x86::qk_f32(q, ldq, rows, d, k, panels, s, lds))
    }

    fn row_max(self, s: &[f32]) -> f32 {
        call!(self, x86::row_max(s))
    }

    fn exp_row(
        self,
        s: &mut [f32],
        n: usize,
        n_pad: usize,
        c: f32,
        sub: f32,
        _p: &mut [f32],
    ) -> f32 {
        assert!(n <= n_pad && n_pad <= s.len());
        call!(self, x86::exp_row_f32(s, n, n_pad, c, sub))
    }

    fn pv(
        self,
        p: &[f32],
        ldp: usize,
        rows: usize,
        keys: usize,
        v: &[f32],
        dv_pad: usize,
        o: &mut [f32],
        corr: &[f32],
    ) {
        x86_check::pv(
            p.len(),
            ldp,
            rows,
            keys,
            v.len(),
            dv_pad,
            o.len(),
            corr.len(),
            1,
        );
        call!(self, x86::pv_f32(p, ldp, rows, keys, v, dv_pad, o, corr))
    }
}

impl Micro for Bf16 {
    type E = u16;
    type P = u16;
    const SEPARATE_P: bool = true;
    const ENGINE: Engine = Engine::Avx512Bf16;

    fn load_q<T: Element>(self, src: &[T], dst: &mut [u16]) {
        pack::q_row_bf16(src, dst);
    }

    fn pack_k<'a, T: Element>(
        self,
        key: impl Fn(usize) -> &'a [T],
        n: usize,
        d: usize,
        dst: &mut [u16],
    ) {
        pack::k_panel_bf16(key, n, d, dst);
    }

    fn pack_v<'a, T: Element>(
        self,
        value: impl Fn(usize) -> &'a [T],
        n: usize,
        dv: usize,
        dst: &mut [u16],
    ) {
        pack::v_panel_bf16(value, n, dv, dst);
    }

    fn qk(
        self,
        q: &[u16],
        ldq: usize,
        rows: usize,
        d: usize,
        k: &[u16],
        panels: usize,
        s: &mut [f32],
        lds: usize,
    ) {
        let d2 = d.div_ceil(2);
        x86_check::qk(q.len(), ldq, rows, 2 * d2, k.len(), panels, s.len(), lds, 2);
        call!(self, x86::qk_bf16(q, ldq, rows, d2, k, panels, s, lds))
    }

    fn row_max(self, s: &[f32]) -> f32 {
        call!(self, x86::row_max(s))
    }

    fn exp_row(
        self,
        s: &mut [f32],
        n: usize,
        n_pad: usize,
        c: f32,
        sub: f32,
        p: &mut [u16],
    ) -> f32 {
        // Whole 16-lane stores up to n_pad.
        assert!(n <= n_pad && n_pad <= s.len() && n_pad <= p.len() && n_pad.is_multiple_of(16));
        call!(self, x86::exp_row_bf16(s, n, n_pad, c, sub, p))
    }

    fn pv(
        self,
        p: &[u16],
        ldp: usize,
        rows: usize,
        keys: usize,
        v: &[u16],
        dv_pad: usize,
        o: &mut [f32],
        corr: &[f32],
    ) {
        x86_check::pv(
            p.len(),
            ldp,
            rows,
            keys,
            v.len(),
            dv_pad,
            o.len(),
            corr.len(),
            2,
        );
        call!(self, x86::pv_bf16(p, ldp, rows, keys, v, dv_pad, o, corr))
    }
}

/// Bounds checks done once per call, so that the micro-kernels can use unchecked pointer arithmetic.
/// A failure is a bug in the driver, never a user error (the driver sizes every buffer itself).
mod x86_check {
    use super::super::PANEL;

    #[allow(clippy::too_many_arguments)]
    pub fn qk(
        q: usize,
        ldq: usize,
        rows: usize,
        d: usize,
        k: usize,
        panels: usize,
        s: usize,
        lds: usize,
        _pair: usize,
    ) {
        assert!(
            ldq >= d && (rows == 0 || (rows - 1) * ldq + d <= q),
            "query block too small"
        );
        assert!(panels * PANEL * d <= k, "K panels too small");
        assert!(
            lds >= panels * PANEL && (rows == 0 || (rows - 1) * lds + panels * PANEL <= s),
            "score block too small"
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub fn pv(
        p: usize,
        ldp: usize,
        rows: usize,
        keys: usize,
        v: usize,
        dv_pad: usize,
        o: usize,
        corr: usize,
        _pair: usize,
    ) {
        assert!(
            keys.is_multiple_of(PANEL) && dv_pad.is_multiple_of(16),
            "keys or value width not whole panels/vectors"
        );
        assert!(
            ldp >= keys && (rows == 0 || (rows - 1) * ldp + keys <= p),
            "probability block too small"
        );
        assert!(keys * dv_pad <= v, "V panels too small");
        assert!(rows * dv_pad <= o && rows <= corr, "accumulator too small");
    }
}
