//! `resid._resid`: the Python face of the resid library. It parses Python arguments, calls the
//! library with the GIL released, and renders results as numpy arrays (handing the engine's
//! buffers to numpy without a copy) and Python exceptions. No engine logic lives here.
mod model;
mod repe;
mod run;
mod steering;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyValueError};
use pyo3::prelude::*;

create_exception!(resid, InputError, PyValueError, "Bad input: arguments, token ids, vector files, layer lists (the CLI's exit code 3).");
create_exception!(resid, ModelError, PyException, "An unusable model directory: config, weights, tensors, tokenizer (exit code 4).");
create_exception!(resid, DeviceError, PyException, "A compute device that cannot be used, e.g. `cuda` without a GPU (exit code 5).");

/// The library's error as the Python exception its class maps to, with the CLI's one-line message.
pub(crate) fn to_py(e: resid::Error) -> PyErr {
    let msg = e.to_string();
    match e {
        resid::Error::Input(_) => InputError::new_err(msg),
        resid::Error::Model(_) => ModelError::new_err(msg),
        resid::Error::Device(_) => DeviceError::new_err(msg),
        resid::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        resid::Error::Io { .. } | resid::Error::Locked { .. } => PyOSError::new_err(msg),
        resid::Error::Interrupted { .. } => {
            // A notebook goes on after a KeyboardInterrupt: the next call must not stop at once.
            resid::interrupt::clear();
            PyKeyboardInterrupt::new_err(msg)
        }
    }
}

pub(crate) fn input_err(msg: impl Into<String>) -> PyErr {
    InputError::new_err(msg.into())
}

#[pymodule]
fn _resid(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    m.add_class::<model::Model>()?;
    m.add_class::<model::Inputs>()?;
    m.add_class::<steering::Steering>()?;
    m.add_function(wrap_pyfunction!(repe::concept_vectors, m)?)?;
    m.add_function(wrap_pyfunction!(repe::recognize, m)?)?;
    m.add_function(wrap_pyfunction!(repe::study, m)?)?;
    m.add_function(wrap_pyfunction!(model::set_threads, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
