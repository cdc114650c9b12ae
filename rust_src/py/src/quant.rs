//! Python bindings of `crate::quant`.

use crate::arrays::{extract_codes, fill_output, slice, FloatArray, OutBuf};
use crate::{guard, to_py_err, usize_arg};
use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use vramkit_core::quant::{self, CastRule, Format, Overflow};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fp8_cast, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(error_stats, m)?)?;
    Ok(())
}

/// Runs `$body` with `$s` bound to the input as a typed slice (`f32`, `half::f16` or `half::bf16`).
macro_rules! with_float_slice {
    ($arr:expr, $name:expr, |$s:ident| $body:expr) => {
        match &$arr {
            FloatArray::F32(a) => {
                let $s = slice($name, a)?;
                $body
            }
            FloatArray::F16(a) => {
                let $s = slice($name, a)?;
                $body
            }
            FloatArray::Bf16(a) => {
                let $s: &[half::bf16] = bytemuck::cast_slice(slice($name, a)?);
                $body
            }
        }
    };
}

fn parse_format(fmt: &str) -> PyResult<Format> {
    Format::parse(fmt).map_err(to_py_err)
}

/// The overflow rule of the unscaled cast: `overflow` for finite values beyond the range, `inf` for ±inf;
/// either omitted is c10's unsaturated outcome for the format (NaN for e4m3fn, infinity for e5m2).
fn cast_rule(fmt: Format, overflow: Option<&str>, inf: Option<&str>) -> PyResult<CastRule> {
    let default = CastRule::unsaturated(fmt);
    let parse = |what: &str, name: Option<&str>, or: Overflow| {
        name.map_or(Ok(or), |n| Overflow::parse(what, n))
            .map_err(to_py_err)
    };
    let rule = CastRule {
        finite: parse("overflow", overflow, default.finite)?,
        inf: parse("inf", inf, default.inf)?,
    };
    rule.codes(fmt).map_err(to_py_err)?; // a rule the format cannot write (e4m3fn has no infinity), or int8
    Ok(rule)
}

#[pyfunction]
#[pyo3(signature = (x, fmt, out=None, *, overflow=None, inf=None))]
fn fp8_cast<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    fmt: &str,
    out: Option<Bound<'py, PyArrayDyn<u8>>>,
    overflow: Option<&str>,
    inf: Option<&str>,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    guard("fp8_cast", || {
        let fmt = parse_format(fmt)?;
        let rule = cast_rule(fmt, overflow, inf)?;
        let x = FloatArray::extract("x", x)?;
        with_float_slice!(x, "x", |s| fill_output(py, "out", out, &x.shape(), |d| {
            quant::fp8_cast(fmt, rule, s, d)
        }))
    })
}

#[pyfunction]
#[pyo3(signature = (x, fmt, block_len, out=None, scales_out=None))]
fn quantize<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    fmt: &str,
    block_len: &Bound<'py, PyAny>,
    out: Option<Bound<'py, PyAny>>,
    scales_out: Option<Bound<'py, PyArrayDyn<f32>>>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyArrayDyn<f32>>)> {
    guard("quantize", || {
        let fmt = parse_format(fmt)?;
        let block_len = usize_arg("block_len", block_len, 0)?;
        let x = FloatArray::extract("x", x)?;
        let shape = x.shape();
        let n: usize = shape.iter().product();
        let n_blocks = quant::block_count(n, block_len).map_err(to_py_err)?;
        let code_dtype = if fmt.is_fp8() { "uint8" } else { "int8" };

        let codes_given = out
            .as_ref()
            .map(|o| {
                o.call_method1("view", ("uint8",))?
                    .cast_into::<PyArrayDyn<u8>>()
                    .map_err(PyErr::from)
            })
            .transpose()
            .map_err(|_| PyValueError::new_err("out must be a numpy uint8 or int8 array"))?;
        let mut codes = OutBuf::new("out", codes_given, &shape)?;
        let mut scales = OutBuf::new("scales_out", scales_out, &[n_blocks])?;
        {
            let fresh = codes.is_fresh();
            let c = codes.as_mut_slice("out")?;
            let sc = scales.as_mut_slice("scales_out")?;
            with_float_slice!(x, "x", |s| py.detach(|| {
                if fresh {
                    vramkit_core::alloc::populate(c);
                }
                quant::quantize(fmt, s, block_len, c, sc)
            }))
            .map_err(to_py_err)?;
        }
        let codes = match out {
            Some(o) => o,
            None => codes
                .finish(py, &shape)?
                .call_method1("view", (code_dtype,))?,
        };
        Ok((codes, scales.finish(py, &[n_blocks])?))
    })
}

#[pyfunction]
#[pyo3(signature = (codes, fmt, scales, block_len, out_dtype, out=None))]
fn dequantize<'py>(
    py: Python<'py>,
    codes: &Bound<'py, PyAny>,
    fmt: &str,
    scales: Option<Bound<'py, PyAny>>,
    block_len: &Bound<'py, PyAny>,
    out_dtype: &str,
    out: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    guard("dequantize", || {
        let fmt = parse_format(fmt)?;
        let block_len = usize_arg("block_len", block_len, 0)?;
        let codes = extract_codes(codes)?;
        let c = slice("codes", &codes)?;
        let scales = scales
            .map(|s| s.extract::<PyReadonlyArrayDyn<'py, f32>>())
            .transpose()
            .map_err(|_| PyValueError::new_err("scales must be a numpy float32 array or None"))?;
        let sc = scales.as_ref().map(|s| slice("scales", s)).transpose()?;
        let shape = codes.shape().to_vec();

        // `$t` is the element the kernel writes, `$store` the numpy element that holds it.
        macro_rules! run {
            ($t:ty, $store:ty) => {{
                let out = out
                    .map(|o| o.cast_into::<PyArrayDyn<$store>>())
                    .transpose()
                    .map_err(|_| {
                        PyValueError::new_err(format!("out must be a numpy array for {out_dtype}"))
                    })?;
                let arr = fill_output(py, "out", out, &shape, |d: &mut [$store]| {
                    let dst: &mut [$t] = bytemuck::cast_slice_mut(d);
                    quant::dequantize(fmt, c, sc, block_len, dst)
                })?;
                Ok(arr.into_any())
            }};
        }
        match out_dtype {
            "float32" => run!(f32, f32),
            "float16" => run!(half::f16, half::f16),
            "bfloat16" => run!(half::bf16, u16),
            other => Err(PyValueError::new_err(format!(
                "out_dtype {other:?} is not supported; accepted: float32, float16, bfloat16"
            ))),
        }
    })
}

#[pyfunction]
#[pyo3(signature = (x, codes, fmt, scales, block_len))]
fn error_stats<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    codes: &Bound<'py, PyAny>,
    fmt: &str,
    scales: Option<PyReadonlyArrayDyn<'py, f32>>,
    block_len: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    guard("error_stats", || {
        let fmt = parse_format(fmt)?;
        let block_len = usize_arg("block_len", block_len, 0)?;
        let x = FloatArray::extract("x", x)?;
        let codes = extract_codes(codes)?;
        let c = slice("codes", &codes)?;
        let sc = scales.as_ref().map(|s| slice("scales", s)).transpose()?;
        let stats = with_float_slice!(x, "x", |s| py
            .detach(|| quant::error_stats(fmt, s, c, sc, block_len)))
        .map_err(to_py_err)?;
        let d = PyDict::new(py);
        d.set_item("max_abs", stats.max_abs)?;
        d.set_item("rmse", stats.rmse)?;
        d.set_item("snr_db", stats.snr_db)?;
        Ok(d)
    })
}
