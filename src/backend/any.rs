//! A loaded model on whichever backend a face's `--device` (or `device=`) names, so that the
//! CLI and the Python package dispatch devices the same way.
use crate::backend::cpu::{self, gemm, Compute, CpuBackend};
use crate::backend::cuda::{parse_device, CudaBackend};
use crate::backend::Backend;
use crate::engine::Engine;
use crate::error::{Error, Result};
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

/// Chooses the CPU arithmetic before a model is loaded on `device` (`None`: f32). The choice
/// is per process (matrices take it when they are created), so asking for another one after a
/// CPU model was loaded is an error. f32 on CUDA is an error too: CUDA computes in bf16. Returns
/// a note when bf16 was asked for where it does not run (see [`gemm::bf16_note`]).
pub fn choose_compute(device: &str, asked: Option<Compute>) -> Result<Option<String>> {
    static CHOSEN: std::sync::Mutex<Option<Compute>> = std::sync::Mutex::new(None);
    if parse_device(device)?.is_some() {
        return match asked {
            Some(Compute::F32) => Err(Error::input("--compute f32: the CUDA backend computes in bf16 (f32 residual stream); --compute applies to the CPU")),
            _ => Ok(None),
        };
    }
    let asked = asked.unwrap_or(Compute::F32);
    let mut chosen = CHOSEN.lock().unwrap_or_else(|e| e.into_inner());
    match *chosen {
        Some(c) if c != asked => {
            return Err(Error::input(format!("compute {}: this process already loaded a CPU model with compute {} (the compute type is chosen once per process)", asked.name(), c.name())))
        }
        _ => *chosen = Some(asked),
    }
    cpu::set_compute(asked);
    Ok((cpu::compute() != asked).then(|| format!("--compute {}: {}", asked.name(), gemm::bf16_note())))
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
