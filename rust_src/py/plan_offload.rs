//! Python bindings of `crate::plan::offload`.

use super::{to_py_err, usize_arg};
use crate::plan::offload::{plan_resident, BufferRule, Layer};
use crate::value_err;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(plan_offload, m)?)?;
    Ok(())
}

/// Which layers ComfyUI keeps resident for `budget` bytes (see `plan::offload`). Layers are given in
/// ComfyUI's name order as three equally long lists; returns a dict with `resident` (one bool per layer),
/// `resident_bytes`, `streamed_bytes`, `streamed_layers`, `unplaced_layers`, `buffer_bytes` and `full_load`.
#[pyfunction]
#[pyo3(signature = (bytes, cast_bytes, streamable, budget, model_bytes, streams, rule))]
#[allow(clippy::too_many_arguments)]
fn plan_offload<'py>(
    py: Python<'py>,
    bytes: &Bound<'py, PyAny>,
    cast_bytes: &Bound<'py, PyAny>,
    streamable: Vec<bool>,
    budget: &Bound<'py, PyAny>,
    model_bytes: &Bound<'py, PyAny>,
    streams: &Bound<'py, PyAny>,
    rule: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let bytes = byte_list("bytes", bytes)?;
    let cast_bytes = byte_list("cast_bytes", cast_bytes)?;
    let budget = usize_arg("budget", budget, 0)? as u64;
    let model_bytes = usize_arg("model_bytes", model_bytes, 0)? as u64;
    let streams = usize_arg("streams", streams, 0)?;
    if cast_bytes.len() != bytes.len() || streamable.len() != bytes.len() {
        return Err(to_py_err(value_err!(
            "bytes, cast_bytes and streamable must be equally long (got {}, {}, {})",
            bytes.len(),
            cast_bytes.len(),
            streamable.len()
        )));
    }
    let rule = BufferRule::parse(rule).map_err(to_py_err)?;
    let layers: Vec<Layer> = bytes
        .iter()
        .zip(&cast_bytes)
        .zip(&streamable)
        .map(|((&bytes, &cast_bytes), &streamable)| Layer {
            bytes,
            cast_bytes,
            streamable,
        })
        .collect();
    let plan = plan_resident(&layers, budget, model_bytes, streams, rule).map_err(to_py_err)?;
    let out = PyDict::new(py);
    out.set_item("resident", plan.resident)?;
    out.set_item("resident_bytes", plan.resident_bytes)?;
    out.set_item("streamed_bytes", plan.streamed_bytes)?;
    out.set_item("streamed_layers", plan.streamed_layers)?;
    out.set_item("unplaced_layers", plan.unplaced_layers)?;
    out.set_item("buffer_bytes", plan.buffer_bytes)?;
    out.set_item("full_load", plan.full_load)?;
    Ok(out)
}

/// A list of byte counts; anything but non-negative ints is a ValueError naming the list.
fn byte_list(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    obj.extract::<Vec<u64>>().map_err(|_| {
        PyValueError::new_err(format!(
            "{name} must be a list of non-negative ints (byte counts)"
        ))
    })
}
