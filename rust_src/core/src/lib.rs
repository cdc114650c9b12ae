//! VRAMKit's pure-Rust core: the numeric kernels (`quant`, `attention`) and the planners (`plan`), on
//! plain slices and sizes. It knows nothing of Python; the `vramkit-py` crate (`rust_src/py`) binds it as
//! `vramkit._core`.
//!
//! Module dependencies run one way: `error`, `alloc`, `simd` <- `quant` (element types, kernels) <-
//! `attention` (kernel, engines, blocks) <- `plan` (budget planners); `io` (safetensors files streamed
//! through the quantizers) uses `quant` only.

pub mod alloc;
pub mod attention;
pub mod error;
pub mod io;
pub mod plan;
pub mod quant;
pub mod simd;
