//! Typed errors for the library. Each variant maps to one documented exit code class.
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something the user supplied (input file, vector file, flag value) is wrong.
    #[error("{0}")]
    Input(String),
    /// The model directory, its config or its weights are unusable.
    #[error("{0}")]
    Model(String),
    /// A compute device could not be used.
    #[error("{0}")]
    Device(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another live process holds the lock on an output (a directory, a file or a cache).
    #[error("{}: in use by another resid run ({}); wait for it to finish or pass --wait-lock", path.display(), holder.map_or("pid unknown".to_string(), |p| format!("pid {p}")))]
    Locked { path: PathBuf, holder: Option<u32> },
    /// SIGINT or SIGTERM arrived; the run stopped between batches and removed its temporary
    /// files. `what` says what was kept.
    #[error("interrupted by {}: {what}", crate::interrupt::signal_name(*signal))]
    Interrupted { signal: i32, what: String },
}

impl Error {
    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }
    pub fn model(msg: impl Into<String>) -> Self {
        Error::Model(msg.into())
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// The same error again, for each of several requests that one failure ends (an I/O
    /// error's source becomes its message).
    pub fn replicate(&self) -> Self {
        match self {
            Error::Input(m) => Error::Input(m.clone()),
            Error::Model(m) => Error::Model(m.clone()),
            Error::Device(m) => Error::Device(m.clone()),
            Error::Io { path, source } => Error::Io { path: path.clone(), source: std::io::Error::new(source.kind(), source.to_string()) },
            Error::Locked { path, holder } => Error::Locked { path: path.clone(), holder: *holder },
            Error::Interrupted { signal, what } => Error::Interrupted { signal: *signal, what: what.clone() },
        }
    }

    /// The same error with `what: ` before its message (Input, Model and Device errors).
    pub fn prefixed(self, what: &str) -> Self {
        match self {
            Error::Input(m) => Error::Input(format!("{what}: {m}")),
            Error::Model(m) => Error::Model(format!("{what}: {m}")),
            Error::Device(m) => Error::Device(format!("{what}: {m}")),
            e => e,
        }
    }

    /// Process exit code for this error class (documented in README.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Input(_) => 3,
            Error::Model(_) => 4,
            Error::Device(_) => 5,
            Error::Io { .. } | Error::Locked { .. } => 6,
            // The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM.
            Error::Interrupted { signal, .. } => 128 + signal,
        }
    }
}
