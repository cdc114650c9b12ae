//! Python bindings of the planners: `vramkit_core::plan::attention` (attention under a memory budget) and
//! `vramkit_core::plan::offload` (which layers stay on the GPU).

use crate::{guard, opt_usize_arg, to_py_err, usize_arg};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use vramkit_core::attention::{Dims, Engine};
use vramkit_core::plan::attention::{plan_attention as plan, Request};
use vramkit_core::plan::offload::{plan_resident, BufferRule, Layer};
use vramkit_core::value_err;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(plan_attention, m)?)?;
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
    guard("plan_offload", || {
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
    })
}

/// A list of byte counts; anything but non-negative ints is a ValueError naming the list.
fn byte_list(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    obj.extract::<Vec<u64>>().map_err(|_| {
        PyValueError::new_err(format!(
            "{name} must be a list of non-negative ints (byte counts)"
        ))
    })
}

#[pyfunction]
#[pyo3(signature = (batch, heads, q_len, kv_len, head_dim, dtype_bytes, budget_bytes, *, v_head_dim=None,
                    threads=None, torch_threads=None, engine=None))]
#[allow(clippy::too_many_arguments)]
fn plan_attention<'py>(
    py: Python<'py>,
    batch: &Bound<'py, PyAny>,
    heads: &Bound<'py, PyAny>,
    q_len: &Bound<'py, PyAny>,
    kv_len: &Bound<'py, PyAny>,
    head_dim: &Bound<'py, PyAny>,
    dtype_bytes: &Bound<'py, PyAny>,
    budget_bytes: &Bound<'py, PyAny>,
    v_head_dim: Option<&Bound<'py, PyAny>>,
    threads: Option<&Bound<'py, PyAny>>,
    torch_threads: Option<&Bound<'py, PyAny>>,
    engine: Option<&str>,
) -> PyResult<Bound<'py, PyDict>> {
    guard("plan_attention", || {
        let batch = usize_arg("batch", batch, 0)?;
        let heads = usize_arg("heads", heads, 0)?;
        let q_len = usize_arg("q_len", q_len, 0)?;
        let kv_len = usize_arg("kv_len", kv_len, 0)?;
        let head_dim = usize_arg("head_dim", head_dim, 0)?;
        let dtype_bytes = usize_arg("dtype_bytes", dtype_bytes, 0)?;
        let budget_bytes = usize_arg("budget_bytes", budget_bytes, 0)?;
        let v_head_dim = opt_usize_arg("v_head_dim", v_head_dim, 0)?;
        let threads = opt_usize_arg("threads", threads, 0)?;
        let torch_threads = opt_usize_arg("torch_threads", torch_threads, 0)?;
        let engine = match engine {
            Some(name) => Engine::parse(name).map_err(to_py_err)?,
            None => None,
        };
        let req = Request {
            dims: Dims {
                batch,
                heads,
                q_len,
                kv_len,
                head_dim,
                v_head_dim: v_head_dim.unwrap_or(head_dim),
            },
            dtype_bytes,
            budget_bytes,
            threads: threads.unwrap_or_else(rayon::current_num_threads),
            torch_threads: torch_threads.unwrap_or(0),
            engine,
        };
        let p = plan(&req).map_err(to_py_err)?;
        let d = PyDict::new(py);
        d.set_item("budget_bytes", req.budget_bytes)?;
        d.set_item("block_q", p.blocks.block_q)?;
        d.set_item("block_kv", p.blocks.block_kv)?;
        d.set_item("heads_per_group", p.blocks.heads_per_group)?;
        d.set_item("threads", req.threads)?;
        d.set_item("torch_threads", req.torch_threads)?;
        d.set_item("engine", p.engine.map(|e| e.name()))?;
        d.set_item("kernel_peak_bytes", p.kernel.total)?;
        d.set_item("kernel_per_thread_bytes", p.kernel.per_thread)?;
        d.set_item("kernel_packed_kv_bytes", p.kernel.packed_kv)?;
        d.set_item("kernel_fits", p.kernel_fits())?;
        d.set_item("chunk_q", p.torch.chunk_q)?;
        d.set_item("chunk_kv", p.torch.chunk_kv)?;
        d.set_item("torch_peak_bytes", p.torch.peak_bytes)?;
        d.set_item("torch_fits", p.torch_fits())?;
        d.set_item("slice", p.sliced.slice)?;
        d.set_item("sliced_peak_bytes", p.sliced.peak_bytes)?;
        d.set_item("sliced_fits", p.sliced_fits())?;
        d.set_item("scores_bytes", p.scores_bytes)?;
        d.set_item("summary", p.summary())?;
        Ok(d)
    })
}
