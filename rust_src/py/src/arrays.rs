//! Borrowing numpy arrays as slices, with clear errors for what is not accepted.

use numpy::{
    Element as NpElement, IntoPyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyReadwriteArrayDyn, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// A float input array: float32, float16, or bfloat16 passed as its uint16 bits.
pub enum FloatArray<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, half::f16>),
    Bf16(PyReadonlyArrayDyn<'py, u16>),
}

impl<'py> FloatArray<'py> {
    pub fn extract(name: &str, obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'py, f32>>() {
            return Ok(Self::F32(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'py, half::f16>>() {
            return Ok(Self::F16(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'py, u16>>() {
            return Ok(Self::Bf16(a));
        }
        Err(PyTypeError::new_err(format!(
            "{name} must be a numpy array of float32, float16, or uint16 holding bfloat16 bits; got {}",
            describe(obj)
        )))
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            Self::F32(a) => a.shape().to_vec(),
            Self::F16(a) => a.shape().to_vec(),
            Self::Bf16(a) => a.shape().to_vec(),
        }
    }
}

/// An 8-bit code array: uint8 (fp8 bits) or int8.
pub fn extract_codes<'py>(obj: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArrayDyn<'py, u8>> {
    if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'py, u8>>() {
        return Ok(a);
    }
    if let Ok(a) = obj.extract::<Bound<'py, PyArrayDyn<i8>>>() {
        // Same bytes, viewed as uint8 so one kernel serves both.
        let view = a.call_method1("view", ("uint8",))?;
        return view.extract::<PyReadonlyArrayDyn<'py, u8>>();
    }
    Err(PyTypeError::new_err(format!(
        "codes must be a numpy array of uint8 (fp8 bits) or int8; got {}",
        describe(obj)
    )))
}

/// A short description of a Python object for error messages: dtype and shape for arrays.
pub fn describe(obj: &Bound<'_, PyAny>) -> String {
    match (obj.getattr("dtype"), obj.getattr("shape")) {
        (Ok(d), Ok(s)) => format!("an array of dtype {d} and shape {s}"),
        _ => format!(
            "an object of type {}",
            obj.get_type()
                .name()
                .map_or_else(|_| "?".into(), |n| n.to_string())
        ),
    }
}

/// The elements of a C-ordered array. `as_slice` alone also accepts Fortran-ordered arrays, whose memory
/// order is not the row-major order every kernel assumes, so C order is checked first.
pub fn slice<'a, T: NpElement>(name: &str, a: &'a PyReadonlyArrayDyn<'_, T>) -> PyResult<&'a [T]> {
    if !a.is_c_contiguous() {
        return Err(not_contiguous(name));
    }
    a.as_slice().map_err(|_| not_contiguous(name))
}

pub fn slice_mut<'a, T: NpElement>(
    name: &str,
    a: &'a mut PyReadwriteArrayDyn<'_, T>,
) -> PyResult<&'a mut [T]> {
    if !a.is_c_contiguous() {
        return Err(not_contiguous(name));
    }
    a.as_slice_mut().map_err(|_| not_contiguous(name))
}

fn not_contiguous(name: &str) -> PyErr {
    PyValueError::new_err(format!(
        "{name} must be C-contiguous and aligned; pass np.ascontiguousarray(...) (or tensor.contiguous())"
    ))
}

pub fn check_out_shape(name: &str, got: &[usize], want: &[usize]) -> PyResult<()> {
    if got != want {
        return Err(PyValueError::new_err(format!(
            "{name} has shape {got:?}, expected {want:?}"
        )));
    }
    Ok(())
}

/// Hands a vector to numpy as an array of `shape`, without copying.
pub fn into_array<'py, T: NpElement>(
    py: Python<'py>,
    shape: &[usize],
    v: Vec<T>,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    numpy::ndarray::ArrayD::from_shape_vec(numpy::ndarray::IxDyn(shape), v)
        .map(|a| a.into_pyarray(py))
        .map_err(|e| PyValueError::new_err(format!("internal shape error: {e}")))
}

/// A kernel's output buffer: the caller's array (borrowed for writing) or a new vector (huge-page backed
/// when large) that is handed to numpy without a copy once the kernel has filled it.
pub enum OutBuf<'py, T: NpElement> {
    Given(PyReadwriteArrayDyn<'py, T>),
    Owned(Vec<T>),
}

impl<'py, T: NpElement + bytemuck::Zeroable> OutBuf<'py, T> {
    pub fn new(
        name: &str,
        given: Option<Bound<'py, PyArrayDyn<T>>>,
        shape: &[usize],
    ) -> PyResult<Self> {
        match given {
            Some(a) => {
                check_out_shape(name, a.shape(), shape)?;
                let rw = a
                    .try_readwrite()
                    .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
                if !rw.is_c_contiguous() {
                    return Err(not_contiguous(name));
                }
                Ok(Self::Given(rw))
            }
            None => vramkit_core::alloc::try_zeroed_vec(element_count(name, shape)?, name)
                .map(Self::Owned)
                .map_err(super::to_py_err),
        }
    }

    /// True for a buffer made here, which nothing has touched yet (see `alloc::populate`).
    pub fn is_fresh(&self) -> bool {
        matches!(self, Self::Owned(_))
    }

    pub fn as_mut_slice(&mut self, name: &str) -> PyResult<&mut [T]> {
        match self {
            Self::Given(rw) => slice_mut(name, rw),
            Self::Owned(v) => Ok(v.as_mut_slice()),
        }
    }

    pub fn finish(self, py: Python<'py>, shape: &[usize]) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
        match self {
            Self::Given(rw) => Ok((**rw).clone()),
            Self::Owned(v) => into_array(py, shape, v),
        }
    }
}

/// The number of elements of `shape`, or a ValueError when it does not fit in memory's address space.
fn element_count(name: &str, shape: &[usize]) -> PyResult<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "{name} of shape {shape:?} is too large to allocate"
            ))
        })
}

/// Runs `fill` (with the GIL released) on the output: `out` if given, else a new array of `shape`.
pub fn fill_output<'py, T, F>(
    py: Python<'py>,
    name: &str,
    out: Option<Bound<'py, PyArrayDyn<T>>>,
    shape: &[usize],
    fill: F,
) -> PyResult<Bound<'py, PyArrayDyn<T>>>
where
    T: NpElement + bytemuck::Zeroable + Send,
    F: FnOnce(&mut [T]) -> vramkit_core::error::CoreResult<()> + Send,
{
    let mut buf = OutBuf::new(name, out, shape)?;
    let fresh = buf.is_fresh();
    let dst = buf.as_mut_slice(name)?;
    py.detach(|| {
        if fresh {
            vramkit_core::alloc::populate(dst);
        }
        fill(dst)
    })
    .map_err(super::to_py_err)?;
    buf.finish(py, shape)
}
