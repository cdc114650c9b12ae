//! The panic guard: every binding runs its body in `guard`, so that a Rust panic reaches Python as a
//! `RuntimeError` naming the call instead of pyo3's `PanicException`. That one derives from
//! `BaseException`, which ComfyUI's executor does not catch (it catches `Exception`): an escaped panic would
//! stop the whole queue where a `RuntimeError` only fails the node. `tests/test_panic_guard.py` checks that
//! every `#[pyfunction]` of this crate starts with `guard("<its name>", || ...)`, and the tests below check
//! what Python sees (a panic on the calling thread and one in a rayon worker, under `py.detach`).

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs a binding's body; a panic becomes `RuntimeError("vramkit._core.<call> panicked: <message>; ...")`.
///
/// `AssertUnwindSafe`: after a panic nothing the body touched is used again except a caller's `out=` array,
/// which may then hold partial results (the error says the call failed); fresh outputs are dropped.
pub fn guard<T>(call: &str, body: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| Err(panic_error(call, &*payload)))
}

/// The `RuntimeError` for a panic of `call` carrying `payload`.
pub fn panic_error(call: &str, payload: &(dyn Any + Send)) -> PyErr {
    let message = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_string()
    };
    PyRuntimeError::new_err(format!(
        "vramkit._core.{call} panicked: {message}; this is a bug in VRAMKit, please report it"
    ))
}

/// A binding that panics on purpose, in the tests and in builds with the cargo feature `test-panic` only:
/// on the calling thread, or (with `in_worker`) in a rayon worker with the GIL released, as a kernel would.
#[cfg(any(test, feature = "test-panic"))]
#[pyfunction]
#[pyo3(signature = (message, in_worker=false))]
pub fn _test_panic(py: Python<'_>, message: &str, in_worker: bool) -> PyResult<()> {
    guard("_test_panic", || {
        if in_worker {
            use rayon::prelude::*;
            let message = message.to_string();
            py.detach(|| {
                (0..64usize).into_par_iter().for_each(|i| {
                    if i == 37 {
                        panic!("{message}");
                    }
                })
            });
            Ok(())
        } else {
            panic!("{message}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyo3::exceptions::PyException;
    use pyo3::types::PyModule;

    #[test]
    fn a_panic_becomes_a_runtime_error_naming_the_call() {
        Python::attach(|py| {
            // The whole module, as `import vramkit._core` builds it (the test entry is registered under
            // cfg(test)).
            let m = PyModule::new(py, "_core").unwrap();
            crate::_core(&m).unwrap();
            let f = m.getattr("_test_panic").unwrap();
            for in_worker in [false, true] {
                let err = f.call1(("boom 42", in_worker)).unwrap_err();
                assert!(err.is_instance_of::<PyRuntimeError>(py), "{err}");
                // An `Exception`, which ComfyUI's executor catches (pyo3's PanicException is not one).
                assert!(err.is_instance_of::<PyException>(py));
                let text = err.value(py).to_string();
                assert!(
                    text.starts_with("vramkit._core._test_panic panicked: boom 42;"),
                    "{text}"
                );
            }
            // The same from Python code, the way ComfyUI's executor sees it.
            let code = c"
try:
    m._test_panic('from python')
    outcome = 'no error'
except Exception as e:
    outcome = type(e).__name__ + ': ' + str(e)
";
            let locals = pyo3::types::PyDict::new(py);
            locals.set_item("m", &m).unwrap();
            py.run(code, None, Some(&locals)).unwrap();
            let outcome: String = locals
                .get_item("outcome")
                .unwrap()
                .unwrap()
                .extract()
                .unwrap();
            assert!(
                outcome
                    .starts_with("RuntimeError: vramkit._core._test_panic panicked: from python"),
                "{outcome}"
            );
            // A binding that does not panic passes its result through the guard unchanged.
            let level: String = m
                .getattr("simd_level")
                .unwrap()
                .call0()
                .unwrap()
                .extract()
                .unwrap();
            assert_eq!(level, vramkit_core::simd::level().name());
        });
    }

    #[test]
    fn payloads_without_a_string_still_name_the_call() {
        Python::attach(|py| {
            let err = guard::<()>("x", || std::panic::panic_any(17u32)).unwrap_err();
            assert!(err.is_instance_of::<PyRuntimeError>(py));
            assert!(err
                .value(py)
                .to_string()
                .starts_with("vramkit._core.x panicked: (a panic without a message)"));
        });
    }
}
