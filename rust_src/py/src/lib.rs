//! `vramkit._core`: the Python bindings of `vramkit-core`. This crate converts numpy arrays to slices,
//! releases the GIL around kernels, and maps `CoreError` to Python exceptions; no numerics live here.

mod arrays;
mod attention;
mod bench;
mod guard;
mod io;
mod plan;
mod plan_fit;
mod quant;

use pyo3::exceptions::{PyMemoryError, PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBool;
use vramkit_core::error::CoreError;

pub use guard::guard;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    guard("<module init>", || {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add_function(wrap_pyfunction!(simd_level, m)?)?;
        quant::register(m)?;
        attention::register(m)?;
        io::register(m)?;
        plan::register(m)?;
        plan_fit::register(m)?;
        bench::register(m)?;
        #[cfg(any(test, feature = "test-panic"))]
        m.add_function(wrap_pyfunction!(guard::_test_panic, m)?)?;
        Ok(())
    })
}

/// The vector instruction set the kernels use on this CPU.
#[pyfunction]
fn simd_level() -> PyResult<&'static str> {
    guard("simd_level", || Ok(vramkit_core::simd::level().name()))
}

/// An int argument in `min..=usize::MAX`. pyo3's own extraction raises OverflowError for negative or huge
/// ints; this raises a ValueError naming the argument and the accepted range instead, and a TypeError for
/// what is not an int (bool included, though Python counts it as one). numpy integers are accepted.
pub fn usize_arg(name: &str, obj: &Bound<'_, PyAny>, min: usize) -> PyResult<usize> {
    let accepted = match min {
        0 => format!("a non-negative int (0 to {})", usize::MAX),
        1 => format!("a positive int (1 to {})", usize::MAX),
        _ => format!("an int from {min} to {}", usize::MAX),
    };
    if obj.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "{name} must be {accepted}; got a bool ({obj})"
        )));
    }
    match obj.extract::<usize>() {
        Ok(v) if v >= min => Ok(v),
        Ok(v) => Err(PyValueError::new_err(format!(
            "{name} must be {accepted}; got {v}"
        ))),
        Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => Err(PyValueError::new_err(
            format!("{name} must be {accepted}; got {obj}"),
        )),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{name} must be {accepted}; got {}",
            arrays::describe(obj)
        ))),
    }
}

/// `usize_arg` for an optional argument (None stays None).
pub fn opt_usize_arg(
    name: &str,
    obj: Option<&Bound<'_, PyAny>>,
    min: usize,
) -> PyResult<Option<usize>> {
    obj.map(|o| usize_arg(name, o, min)).transpose()
}

pub fn to_py_err(e: CoreError) -> PyErr {
    match e {
        CoreError::Value(m) | CoreError::NonFinite(m) => PyValueError::new_err(m),
        CoreError::Type(m) => PyTypeError::new_err(m),
        CoreError::OutOfMemory(m) => PyMemoryError::new_err(m),
    }
}
