//! `vramkit._core._bench`: helpers for `vramkit bench` only, kept out of the public `_core` API.

use crate::arrays::{fill_output, slice};
use crate::guard;
use pyo3::prelude::*;
use vramkit_core::quant::TASK_ELEMS;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let bench = PyModule::new(m.py(), "_bench")?;
    bench.add_function(wrap_pyfunction!(copy_bytes, &bench)?)?;
    m.add_submodule(&bench)
}

/// A copy of the bytes of a C-contiguous array into a new uint8 array, allocated the way every kernel
/// allocates its output: the bandwidth roofline `vramkit bench` compares the kernels with.
#[pyfunction]
fn copy_bytes<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, numpy::PyArrayDyn<u8>>> {
    guard("_bench.copy_bytes", || {
        let bytes = x
            .call_method1("view", ("uint8",))?
            .call_method1("reshape", (-1,))?;
        let a = bytes.extract::<numpy::PyReadonlyArrayDyn<'py, u8>>()?;
        let src = slice("x", &a)?;
        fill_output(py, "out", None, &[src.len()], |dst| {
            use rayon::prelude::*;
            dst.par_chunks_mut(TASK_ELEMS * 4)
                .zip(src.par_chunks(TASK_ELEMS * 4))
                .for_each(|(d, s)| d.copy_from_slice(s));
            Ok(())
        })
    })
}
