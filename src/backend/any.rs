//! A loaded model on whichever backend a face's `--device` (or `device=`) names, so that the
//! CLI and the Python package dispatch devices the same way.
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{parse_device, CudaBackend};
use crate::backend::Backend;
use crate::engine::Engine;
use crate::error::Result;
use crate::model::ModelDir;
use std::path::Path;

// One per process (or per Python `Model`): boxing the CPU engine would only add an indirection
// to every pass.
#[allow(clippy::large_enum_variant)]
pub enum AnyEngine {
    Cpu(Engine<CpuBackend>),
    Cuda(Box<Engine<CudaBackend>>),
}

/// Runs `$body` with `$e` bound to `&Engine<_>`, whatever the backend of the [`AnyEngine`].
#[macro_export]
macro_rules! with_engine {
    ($any:expr, $e:ident => $body:expr) => {
        match $any {
            $crate::backend::any::AnyEngine::Cpu($e) => $body,
            $crate::backend::any::AnyEngine::Cuda($e) => {
                let $e = &**$e;
                $body
            }
        }
    };
}

/// What loading on a device reports (the CLI prints it on stderr).
pub struct DeviceLoad {
    pub backend: String,
    pub seconds: f64,
    pub memory_used: usize,
}

impl AnyEngine {
    /// Loads the model in `dir` on `device` (`cpu`, `cuda` or `cuda:N`). Without a usable GPU
    /// stack, `cuda` fails with [`crate::Error::Device`] naming what is missing.
    pub fn load(device: &str, dir: &Path) -> Result<(Self, Option<DeviceLoad>)> {
        let device = parse_device(device)?;
        let model = ModelDir::open(dir)?;
        Ok(match device {
            None => (AnyEngine::Cpu(Engine::new(CpuBackend, model)?), None),
            Some(ordinal) => {
                let started = std::time::Instant::now();
                let backend = CudaBackend::new(ordinal)?;
                let engine = Engine::new(backend, model)?;
                engine.backend.synchronize()?;
                let load = DeviceLoad {
                    backend: Backend::name(&engine.backend),
                    seconds: started.elapsed().as_secs_f64(),
                    memory_used: engine.backend.memory_used()?,
                };
                (AnyEngine::Cuda(Box::new(engine)), Some(load))
            }
        })
    }
}
