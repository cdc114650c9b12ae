//! VRAMKit's Rust core, exposed to Python as `vramkit._core`.
//!
//! The numeric kernels (`quant`, `attention`) and the planners (`plan`) are plain Rust on slices and
//! know nothing of Python; `py` is the thin binding layer (numpy views, GIL release, error mapping).

pub mod alloc;
pub mod attention;
pub mod error;
pub mod plan;
mod py;
pub mod quant;
pub mod simd;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    py::register(m)
}
