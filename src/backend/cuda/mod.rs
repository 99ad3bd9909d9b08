//! CUDA backend: not built yet (see the CUDA issue). Asking for it is a clear device error.
use crate::error::{Error, Result};

/// Parses `cuda` or `cuda:N` and reports that this build has no CUDA backend yet.
pub fn unavailable(device: &str) -> Result<()> {
    Err(Error::Device(format!(
        "device `{device}`: the CUDA backend is not available in this version of resid yet; use --device cpu"
    )))
}
