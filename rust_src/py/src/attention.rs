//! Python bindings of `vramkit_core::attention` (the kernel and its engines).

use crate::arrays::{describe, fill_output, slice, FloatArray};
use crate::{guard, opt_usize_arg, to_py_err};
use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use vramkit_core::attention::{
    attention as run_attention, Blocks, Dims, Engine, Layout, Mask, MaskValues, Options, Stats,
};
use vramkit_core::quant::FloatType;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(attention, m)?)?;
    m.add_function(wrap_pyfunction!(attention_engines, m)?)?;
    m.add_function(wrap_pyfunction!(attention_engine, m)?)?;
    Ok(())
}

/// A mask array: bool, float32, float16, or uint16 holding bfloat16 bits.
enum MaskArray<'py> {
    /// A bool array's bytes, viewed as uint8: a bool array may hold bytes other than 0 and 1 (torch's
    /// `.view(torch.bool)` of any uint8 data), so it is never read as `&[bool]`; nonzero means attend.
    Bool(PyReadonlyArrayDyn<'py, u8>),
    Float(FloatArray<'py>),
}

impl<'py> MaskArray<'py> {
    fn extract(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(a) = obj.cast::<PyArrayDyn<bool>>() {
            let bytes = a.call_method1("view", ("uint8",))?;
            return Ok(Self::Bool(bytes.extract::<PyReadonlyArrayDyn<'py, u8>>()?));
        }
        FloatArray::extract("mask", obj)
            .map(Self::Float)
            .map_err(|_| {
                PyTypeError::new_err(format!(
                    "mask must be a numpy array of bool (True = attend) or of float32, float16 or uint16 \
                     holding bfloat16 bits (added to the scores); got {}",
                    describe(obj)
                ))
            })
    }

    fn shape(&self) -> Vec<usize> {
        match self {
            Self::Bool(a) => a.shape().to_vec(),
            Self::Float(f) => f.shape(),
        }
    }

    fn values(&self) -> PyResult<MaskValues<'_>> {
        Ok(match self {
            Self::Bool(a) => MaskValues::Bool(slice("mask", a)?),
            Self::Float(FloatArray::F32(a)) => MaskValues::F32(slice("mask", a)?),
            Self::Float(FloatArray::F16(a)) => MaskValues::F16(slice("mask", a)?),
            Self::Float(FloatArray::Bf16(a)) => {
                MaskValues::Bf16(bytemuck::cast_slice(slice("mask", a)?))
            }
        })
    }
}

/// The sizes of q, k, v in `layout`, or a ValueError naming what does not fit together.
fn dims_of(layout: Layout, heads: usize, q: &[usize], k: &[usize], v: &[usize]) -> PyResult<Dims> {
    let want = match layout {
        Layout::Bhnd => 4,
        Layout::Bnhd => 3,
    };
    let form = match layout {
        Layout::Bhnd => "(batch, heads, tokens, head_dim)",
        Layout::Bnhd => "(batch, tokens, heads * head_dim)",
    };
    for (name, s) in [("q", q), ("k", k), ("v", v)] {
        if s.len() != want {
            return Err(PyValueError::new_err(format!(
                "{name} must have {want} dimensions {form}; got shape {s:?}"
            )));
        }
    }
    let mismatch = |what: &str| {
        PyValueError::new_err(format!(
            "q, k and v must agree on {what}; got shapes q {q:?}, k {k:?}, v {v:?} {form}"
        ))
    };
    let split = |name: &str, width: usize| -> PyResult<usize> {
        if heads == 0 || !width.is_multiple_of(heads) {
            return Err(PyValueError::new_err(format!(
                "{name} width {width} is not a multiple of heads={heads}"
            )));
        }
        Ok(width / heads)
    };
    let dims = match layout {
        Layout::Bhnd => {
            if q[0] != k[0] || k[0] != v[0] {
                return Err(mismatch("batch"));
            }
            if q[1] != k[1] || k[1] != v[1] {
                return Err(mismatch("heads"));
            }
            if k[2] != v[2] {
                return Err(mismatch("the key/value length"));
            }
            Dims {
                batch: q[0],
                heads: q[1],
                q_len: q[2],
                kv_len: k[2],
                head_dim: q[3],
                v_head_dim: v[3],
            }
        }
        Layout::Bnhd => {
            if q[0] != k[0] || k[0] != v[0] {
                return Err(mismatch("batch"));
            }
            if k[1] != v[1] {
                return Err(mismatch("the key/value length"));
            }
            Dims {
                batch: q[0],
                heads,
                q_len: q[1],
                kv_len: k[1],
                head_dim: split("q", q[2])?,
                v_head_dim: split("v", v[2])?,
            }
        }
    };
    let k_dim = match layout {
        Layout::Bhnd => k[3],
        Layout::Bnhd => split("k", k[2])?,
    };
    if k_dim != dims.head_dim {
        return Err(mismatch("head_dim (q and k)"));
    }
    Ok(dims)
}

fn stats_dict<'py>(py: Python<'py>, s: &Stats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("engine", s.engine.name())?;
    d.set_item("block_q", s.blocks.block_q)?;
    d.set_item("block_kv", s.blocks.block_kv)?;
    d.set_item("heads_per_group", s.blocks.heads_per_group)?;
    d.set_item("threads", s.threads)?;
    d.set_item("peak_scratch_bytes", s.peak_scratch_bytes)?;
    d.set_item("predicted_scratch_bytes", s.predicted_scratch_bytes)?;
    Ok(d)
}

#[pyfunction]
#[pyo3(signature = (q, k, v, heads=None, mask=None, scale=None, *, block_q=None, block_kv=None,
                    heads_per_group=None, engine="auto"))]
#[allow(clippy::too_many_arguments)]
fn attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    heads: Option<&Bound<'py, PyAny>>,
    mask: Option<&Bound<'py, PyAny>>,
    scale: Option<f32>,
    block_q: Option<&Bound<'py, PyAny>>,
    block_kv: Option<&Bound<'py, PyAny>>,
    heads_per_group: Option<&Bound<'py, PyAny>>,
    engine: &str,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyDict>)> {
    guard("attention", || {
        let heads = opt_usize_arg("heads", heads, 1)?;
        let block_q = opt_usize_arg("block_q", block_q, 1)?;
        let block_kv = opt_usize_arg("block_kv", block_kv, 1)?;
        let heads_per_group = opt_usize_arg("heads_per_group", heads_per_group, 1)?;
        let engine = Engine::parse(engine).map_err(to_py_err)?;
        let (qa, ka, va) = (
            FloatArray::extract("q", q)?,
            FloatArray::extract("k", k)?,
            FloatArray::extract("v", v)?,
        );
        let (layout, h) = match heads {
            None => (Layout::Bhnd, 0),
            Some(h) => (Layout::Bnhd, h),
        };
        let dims = dims_of(layout, h, &qa.shape(), &ka.shape(), &va.shape())?;
        let mask = mask.map(MaskArray::extract).transpose()?;
        let mask_values = mask.as_ref().map(|m| m.values()).transpose()?;
        let mask = match (&mask, mask_values) {
            (Some(m), Some(values)) => {
                let s = m.shape();
                let shape: [usize; 4] = s.as_slice().try_into().map_err(|_| {
                PyValueError::new_err(format!(
                    "mask must have 4 dimensions (batch, heads, q_len, kv_len), each 1 or the full size; \
                     got shape {s:?}"
                ))
            })?;
                Some(Mask { values, shape })
            }
            _ => None,
        };
        let blocks = match (block_q, block_kv, heads_per_group) {
            (None, None, None) => None,
            (bq, bk, g) => {
                let d =
                    vramkit_core::attention::default_blocks(&dims, rayon::current_num_threads());
                Some(Blocks {
                    block_q: bq.unwrap_or(d.block_q),
                    block_kv: bk.unwrap_or(d.block_kv),
                    heads_per_group: g.unwrap_or(d.heads_per_group),
                })
            }
        };
        let opts = Options {
            scale,
            blocks,
            engine,
        };
        let mut out_shape = qa.shape();
        if let Some(last) = out_shape.last_mut() {
            *last = match layout {
                Layout::Bhnd => dims.v_head_dim,
                Layout::Bnhd => dims.v_head_dim * dims.heads,
            };
        }
        let mut stats = None;
        macro_rules! run {
            ($q:expr, $k:expr, $v:expr, $t:ty, $store:ty) => {{
                let (qs, ks, vs): (&[$t], &[$t], &[$t]) = (
                    bytemuck::cast_slice(slice("q", $q)?),
                    bytemuck::cast_slice(slice("k", $k)?),
                    bytemuck::cast_slice(slice("v", $v)?),
                );
                let st = &mut stats;
                let m = mask.as_ref();
                let arr = fill_output(py, "out", None, &out_shape, |o: &mut [$store]| {
                    let o: &mut [$t] = bytemuck::cast_slice_mut(o);
                    *st = Some(run_attention(qs, ks, vs, o, &dims, layout, m, &opts)?);
                    Ok(())
                })?;
                arr.into_any()
            }};
        }
        let out = match (&qa, &ka, &va) {
            (FloatArray::F32(q), FloatArray::F32(k), FloatArray::F32(v)) => run!(q, k, v, f32, f32),
            (FloatArray::F16(q), FloatArray::F16(k), FloatArray::F16(v)) => {
                run!(q, k, v, half::f16, half::f16)
            }
            (FloatArray::Bf16(q), FloatArray::Bf16(k), FloatArray::Bf16(v)) => {
                run!(q, k, v, half::bf16, u16)
            }
            _ => {
                return Err(PyTypeError::new_err(format!(
                    "q, k and v must have the same dtype; got {}, {} and {}",
                    describe(q),
                    describe(k),
                    describe(v)
                )))
            }
        };
        let stats = stats
            .ok_or_else(|| PyValueError::new_err("internal error: the kernel reported nothing"))?;
        Ok((out, stats_dict(py, &stats)?))
    })
}

/// The attention engines this CPU runs, fastest last ("portable" always).
#[pyfunction]
fn attention_engines() -> PyResult<Vec<&'static str>> {
    guard("attention_engines", || {
        Ok(Engine::supported().into_iter().map(|e| e.name()).collect())
    })
}

/// The engine the kernel runs for inputs of `dtype` ("float32", "float16" or "bfloat16") on this CPU, as
/// `engine="auto"` picks it (capped by `VRAMKIT_SIMD`).
#[pyfunction]
fn attention_engine(dtype: &Bound<'_, PyAny>) -> PyResult<&'static str> {
    guard("attention_engine", || {
        let name: String = dtype.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "dtype must be a str naming a float type (float32, float16 or bfloat16); got {}",
                describe(dtype)
            ))
        })?;
        let t = FloatType::parse(&name).map_err(to_py_err)?;
        Ok(Engine::for_type(t).name())
    })
}
