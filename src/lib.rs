//! resid: read and steer the residual stream of large language models.
//!
//! A from-scratch transformer forward pass over memory-mapped safetensors in which capture of
//! hidden states and steering-vector addition are fused into the residual update of each layer.
//!
//! ```no_run
//! use resid::{CpuEngine, CaptureSpec, CapturePoint, CapturePosition};
//! let engine = CpuEngine::load(std::path::Path::new("models/smollm2-135m"))?;
//! let ids = engine.model.tokenizer.as_ref().unwrap().encode("Hello world")?;
//! let spec = CaptureSpec { points: vec![CapturePoint::Hidden(10)], position: CapturePosition::Last };
//! let captured = engine.extract(&[ids], &spec, &[None], 2048, |_, _| {})?;
//! println!("{:?}", &captured.row(0, 0)[..4]);
//! # Ok::<(), resid::Error>(())
//! ```
pub mod backend;
pub mod engine;
pub mod error;
pub mod interrupt;
pub mod io;
pub mod model;
pub mod repe;
pub mod sched;
pub mod server;
pub mod store;
pub mod testing;

pub use backend::cpu::CpuBackend;
pub use engine::capture::{CapturePoint, CapturePosition, CaptureSpec, Captured};
pub use engine::generate::{FinishReason, GenerateOptions, Generation};
pub use engine::sample::Sampling;
pub use engine::steer::{SteerOp, SteerPositions, Steering};
pub use engine::Engine;
pub use error::{Error, Result};

pub type CpuEngine = Engine<CpuBackend>;

impl CpuEngine {
    /// Opens, checks and loads a Hugging Face model directory on the CPU backend.
    pub fn load(dir: &std::path::Path) -> Result<Self> {
        Engine::new(CpuBackend, model::ModelDir::open(dir)?)
    }
}
