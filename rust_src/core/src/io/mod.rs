//! Safetensors files streamed through the quantizers: "quantize once, load fast".
//!
//! `file` opens and validates a file (memory-mapped; the `safetensors` crate reads the header), `plan` lays
//! out the quantized output and its markers (ComfyUI's own where ComfyUI has the scheme), `write` streams
//! the tensors through `crate::quant`'s kernels into a temporary file that is renamed into place when
//! complete. Pure Rust (no Python): the bindings live in `py::io`.

pub mod error;
pub mod file;
pub mod plan;
pub mod source;
pub mod write;

#[cfg(test)]
mod tests;

pub use error::{IoError, IoResult};
pub use file::{SafetensorsFile, TensorEntry};
pub use plan::{Granularity, LayerSpec, Options};
pub use source::{MemorySource, Source};
pub use write::{write_file, LayerReport, Progress, Report};
