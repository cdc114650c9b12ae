//! Python bindings of `crate::io` (safetensors streaming): argument conversion, GIL release, progress
//! callbacks back into Python, and errors as OSError / ValueError.

use super::arrays::slice;
use super::{guard, usize_arg};
use numpy::PyReadonlyArrayDyn;
use pyo3::exceptions::{PyMemoryError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use safetensors::tensor::Dtype;
use std::collections::HashMap;
use std::path::PathBuf;
use vramkit_core::error::CoreError;
use vramkit_core::io::{
    self, Granularity, IoError, LayerSpec, MemorySource, Options, Progress, Report,
    SafetensorsFile, Source,
};
use vramkit_core::quant::Format;

/// Marker tensors larger than this are not returned by `safetensors_header` (they are JSON of a few bytes).
const MAX_MARKER_BYTES: usize = 1 << 16;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(safetensors_header, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_tensors, m)?)?;
    Ok(())
}

fn io_err(e: IoError, cancelled: Option<PyErr>) -> PyErr {
    let mut text = e.to_string();
    // std's message ends in " (os error N)"; Python prints the errno itself.
    if let Some(cut) = text.rfind(" (os error ") {
        text.truncate(cut);
    }
    match e {
        IoError::Os { source, .. } => {
            let errno = source.raw_os_error().or(match source.kind() {
                std::io::ErrorKind::NotFound => Some(libc::ENOENT),
                std::io::ErrorKind::AlreadyExists => Some(libc::EEXIST),
                std::io::ErrorKind::PermissionDenied => Some(libc::EACCES),
                _ => None,
            });
            // OSError(errno, text) becomes the matching subclass (FileNotFoundError, FileExistsError, ...).
            match errno {
                Some(n) => PyOSError::new_err((n, text)),
                None => PyOSError::new_err(text),
            }
        }
        IoError::Corrupt { .. } | IoError::Invalid(_) => PyValueError::new_err(text),
        IoError::Tensor { source, .. } => match source {
            CoreError::Type(_) => PyTypeError::new_err(text),
            CoreError::OutOfMemory(_) => PyMemoryError::new_err(text),
            CoreError::Value(_) | CoreError::NonFinite(_) => PyValueError::new_err(text),
        },
        IoError::Cancelled => cancelled
            .unwrap_or_else(|| PyRuntimeError::new_err("cancelled by the progress callback")),
    }
}

fn parse_format(fmt: &str) -> PyResult<Format> {
    Format::parse(fmt).map_err(super::to_py_err)
}

/// `layers`: (tensor, granularity, group_size or None, rotate group or None) tuples.
fn parse_layers(layers: &Bound<'_, PyAny>) -> PyResult<Vec<LayerSpec>> {
    let mut out = Vec::new();
    for (i, item) in layers.try_iter()?.enumerate() {
        let item = item?;
        let bad = |why: &str| {
            PyValueError::new_err(format!(
                "layers[{i}] must be a (tensor name, granularity, group_size or None, rotate group or \
                 None) tuple: {why}"
            ))
        };
        let (tensor, gran, group, rotate): (
            String,
            String,
            Option<Bound<'_, PyAny>>,
            Option<Bound<'_, PyAny>>,
        ) = item.extract().map_err(|_| bad("got something else"))?;
        let granularity = match gran.as_str() {
            "tensor" => Granularity::Tensor,
            "channel" => Granularity::Channel,
            "group" => {
                let g = group.ok_or_else(|| bad("granularity \"group\" needs a group_size"))?;
                Granularity::Group(usize_arg("group_size", &g, 1)?)
            }
            other => {
                return Err(bad(&format!(
                    "granularity {other:?} is not one of tensor, channel, group"
                )))
            }
        };
        let rotate = rotate.map(|r| usize_arg("rotate", &r, 4)).transpose()?;
        out.push(LayerSpec {
            tensor,
            granularity,
            rotate,
        });
    }
    Ok(out)
}

fn parse_metadata(metadata: Option<&Bound<'_, PyDict>>) -> PyResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    if let Some(d) = metadata {
        for (k, v) in d.iter() {
            let k: String = k
                .extract()
                .map_err(|_| PyTypeError::new_err("metadata keys must be str"))?;
            let v: String = v.extract().map_err(|_| {
                PyTypeError::new_err(format!(
                    "metadata[{k:?}] must be a str (safetensors metadata is text)"
                ))
            })?;
            out.push((k, v));
        }
    }
    out.sort();
    Ok(out)
}

/// Runs the writer with the GIL released; `progress` (a Python callable or None) is called with
/// (tensors_done, tensors_total, bytes_done, bytes_total, tensor_name). Ctrl-C and an exception from the
/// callback cancel the run.
fn run_writer<'py>(
    py: Python<'py>,
    src: &dyn Source,
    dst: PathBuf,
    opts: Options,
    overwrite: bool,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let callback: Option<Py<PyAny>> = progress.map(Bound::unbind);
    let mut raised: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut on_progress = |p: &Progress| -> bool {
            Python::attach(|py| {
                let r = py.check_signals().and_then(|()| match &callback {
                    Some(cb) => cb
                        .call1(
                            py,
                            (
                                p.tensors_done,
                                p.tensors_total,
                                p.bytes_done,
                                p.bytes_total,
                                p.tensor,
                            ),
                        )
                        .map(drop),
                    None => Ok(()),
                });
                match r {
                    Ok(()) => true,
                    Err(e) => {
                        raised = Some(e);
                        false
                    }
                }
            })
        };
        io::write_file(src, &dst, &opts, overwrite, &mut on_progress)
    });
    match result {
        Err(e) => Err(io_err(e, raised)),
        Ok(report) => report_dict(py, &report),
    }
}

fn report_dict<'py>(py: Python<'py>, r: &Report) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("path", r.path.to_string_lossy().into_owned())?;
    d.set_item("input_bytes", r.input_bytes)?;
    d.set_item("output_bytes", r.output_bytes)?;
    d.set_item("tensors", r.tensors)?;
    d.set_item("seconds", r.seconds)?;
    let layers = PyList::empty(py);
    for l in &r.layers {
        let e = PyDict::new(py);
        e.set_item("tensor", &l.tensor)?;
        e.set_item("dtype", l.dtype.to_string())?;
        e.set_item("shape", l.shape.clone())?;
        e.set_item("granularity", l.granularity.name())?;
        e.set_item(
            "group_size",
            match l.granularity {
                Granularity::Group(g) => Some(g),
                _ => None,
            },
        )?;
        e.set_item("rotate", l.rotate)?;
        e.set_item("marker", &l.marker)?;
        e.set_item("native", l.native)?;
        e.set_item("bytes_before", l.bytes_before)?;
        e.set_item("bytes_after", l.bytes_after)?;
        e.set_item("max_abs", l.stats.max_abs)?;
        e.set_item("rmse", l.stats.rmse)?;
        e.set_item("snr_db", l.stats.snr_db)?;
        layers.append(e)?;
    }
    d.set_item("layers", layers)?;
    Ok(d)
}

/// The validated header of a safetensors file: its tensors (data order), `__metadata__`, the raw header
/// bytes, and the bytes of every small `*.comfy_quant` marker tensor. No tensor data is read otherwise.
#[pyfunction]
fn safetensors_header<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    guard("safetensors_header", || {
        let file = py
            .detach(|| SafetensorsFile::open(&path))
            .map_err(|e| io_err(e, None))?;
        let d = PyDict::new(py);
        d.set_item("path", path.to_string_lossy().into_owned())?;
        d.set_item("file_size", file.file_len())?;
        d.set_item("header_len", file.header_len())?;
        d.set_item("header", PyBytes::new(py, file.header_bytes()))?;
        d.set_item("metadata", file.metadata().cloned())?;
        let tensors = PyList::empty(py);
        let markers = PyDict::new(py);
        for t in file.tensors() {
            let e = PyDict::new(py);
            e.set_item("name", &t.name)?;
            e.set_item("dtype", t.dtype.to_string())?;
            e.set_item("shape", t.shape.clone())?;
            e.set_item("start", t.start)?;
            e.set_item("end", t.end)?;
            tensors.append(e)?;
            if t.name.ends_with(io::plan::MARKER_SUFFIX)
                && t.dtype == Dtype::U8
                && t.nbytes() <= MAX_MARKER_BYTES
            {
                markers.set_item(&t.name, PyBytes::new(py, file.data(t)))?;
            }
        }
        d.set_item("tensors", tensors)?;
        d.set_item("markers", markers)?;
        Ok(d)
    })
}

/// Quantizes the `layers` of the safetensors file `src` into a new file `dst` (see `crate::io`).
#[pyfunction]
#[pyo3(signature = (src, dst, fmt, layers, metadata=None, overwrite=false, progress=None))]
#[allow(clippy::too_many_arguments)]
fn quantize_safetensors<'py>(
    py: Python<'py>,
    src: PathBuf,
    dst: PathBuf,
    fmt: &str,
    layers: &Bound<'py, PyAny>,
    metadata: Option<&Bound<'py, PyDict>>,
    overwrite: bool,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    guard("quantize_safetensors", || {
        let opts = Options {
            format: parse_format(fmt)?,
            layers: parse_layers(layers)?,
            metadata: parse_metadata(metadata)?,
        };
        let file = py
            .detach(|| SafetensorsFile::open(&src))
            .map_err(|e| io_err(e, None))?;
        run_writer(
            py,
            &file,
            dst,
            opts,
            overwrite,
            progress.filter(|p| !p.is_none()),
        )
    })
}

fn parse_dtype(name: &str, tensor: &str) -> PyResult<Dtype> {
    serde_json::from_value::<Dtype>(serde_json::Value::String(name.to_string())).map_err(|_| {
        PyValueError::new_err(format!(
            "tensor {tensor:?}: dtype {name:?} is not a safetensors dtype (F32, F16, BF16, I8, U8, ...)"
        ))
    })
}

/// Quantizes in-memory tensors into a new safetensors file `dst`. `tensors` is a list of
/// (name, safetensors dtype, shape, C-contiguous uint8 numpy array of the little-endian bytes).
#[pyfunction]
#[pyo3(signature = (tensors, dst, fmt, layers, metadata=None, overwrite=false, progress=None))]
#[allow(clippy::too_many_arguments)]
fn quantize_tensors<'py>(
    py: Python<'py>,
    tensors: &Bound<'py, PyAny>,
    dst: PathBuf,
    fmt: &str,
    layers: &Bound<'py, PyAny>,
    metadata: Option<&Bound<'py, PyDict>>,
    overwrite: bool,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    guard("quantize_tensors", || {
        let opts = Options {
            format: parse_format(fmt)?,
            layers: parse_layers(layers)?,
            metadata: Vec::new(),
        };
        let meta: HashMap<String, String> = parse_metadata(metadata)?.into_iter().collect();
        let mut arrays: Vec<(String, Dtype, Vec<usize>, PyReadonlyArrayDyn<'py, u8>)> = Vec::new();
        for (i, item) in tensors.try_iter()?.enumerate() {
            let (name, dtype, shape, data): (String, String, Vec<usize>, Bound<'py, PyAny>) =
                item?.extract().map_err(|_| {
                    PyValueError::new_err(format!(
                        "tensors[{i}] must be a (name, dtype, shape, uint8 numpy array) tuple"
                    ))
                })?;
            let dtype = parse_dtype(&dtype, &name)?;
            let array = data.extract::<PyReadonlyArrayDyn<'py, u8>>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "tensors[{i}] ({name:?}): the data must be a numpy uint8 array of the tensor's bytes"
                ))
            })?;
            arrays.push((name, dtype, shape, array));
        }
        let mut list = Vec::with_capacity(arrays.len());
        for (name, dtype, shape, array) in &arrays {
            list.push((name.clone(), *dtype, shape.clone(), slice(name, array)?));
        }
        let source = MemorySource::new(list, (!meta.is_empty()).then_some(meta))
            .map_err(|e| io_err(e, None))?;
        run_writer(
            py,
            &source,
            dst,
            opts,
            overwrite,
            progress.filter(|p| !p.is_none()),
        )
    })
}
