//! Clean interruption of long runs.
//!
//! A face (the CLI, the Python package) turns SIGINT and SIGTERM into a request here; the
//! engine checks it between batches and decode steps and returns [`Error::Interrupted`], so
//! every temporary file is removed on the way out by its owner's destructor and only complete
//! files remain under final names. The library never installs signal handlers itself: a server
//! embedding it keeps its own shutdown.
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicI32, Ordering};

pub const SIGINT: i32 = 2;
pub const SIGTERM: i32 = 15;

/// The signal whose stop was requested, or 0.
static REQUESTED: AtomicI32 = AtomicI32::new(0);

pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Asks every running library call to stop at its next check.
pub fn request(signal: i32) {
    REQUESTED.store(signal, Ordering::SeqCst);
}

/// The signal a stop was requested for, if any.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Forgets a request (a notebook goes on after a KeyboardInterrupt).
pub fn clear() {
    REQUESTED.store(0, Ordering::SeqCst);
}

/// `Err(Interrupted)` once a stop was requested. `what` says what the caller keeps; callers
/// further up that know more replace it ([`Error::interrupted_keeping`]).
pub fn check() -> Result<()> {
    match requested() {
        None => Ok(()),
        Some(signal) => Err(Error::Interrupted { signal, what: "stopped between batches".into() }),
    }
}

impl Error {
    /// This error with a better account of what an interrupted run kept; other errors as they are.
    pub fn interrupted_keeping(self, what: impl Into<String>) -> Self {
        match self {
            Error::Interrupted { signal, .. } => Error::Interrupted { signal, what: what.into() },
            e => e,
        }
    }
}

/// Routes SIGINT and SIGTERM to [`request`] on a thread of their own. The first signal asks for
/// a clean stop (and says so on stderr); a second one removes this process's temporary files and
/// exits at once with 128 + its number. For the command line: call once, at start.
#[cfg(unix)]
pub fn install_handlers() -> Result<()> {
    use signal_hook::iterator::Signals;
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(|e| Error::input(format!("cannot install signal handlers: {e}")))?;
    std::thread::Builder::new()
        .name("resid-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if requested().is_some() {
                    crate::io::remove_live_temp_files();
                    eprintln!("\n{}: exiting at once (no partial file kept)", signal_name(signal));
                    std::process::exit(128 + signal);
                }
                eprintln!("\n{}: stopping after the current batch (press Ctrl-C again to exit at once)", signal_name(signal));
                request(signal);
            }
        })
        .map_err(|e| Error::input(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}

#[cfg(not(unix))]
pub fn install_handlers() -> Result<()> {
    Ok(())
}
