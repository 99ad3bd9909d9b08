//! Running library calls from Python: without the GIL, interruptible by Ctrl-C between batches,
//! with progress reported on the calling thread.
use crate::to_py;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// Work done so far, written by the worker and read by the calling thread.
#[derive(Default)]
pub struct Progress {
    pub done: AtomicUsize,
    pub total: AtomicUsize,
}

impl Progress {
    pub fn set(&self, done: usize, total: usize) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(done, Ordering::Relaxed);
    }
}

/// How often the calling thread looks for Ctrl-C and progress while the work runs.
const POLL: Duration = Duration::from_millis(50);

/// Runs `work` on a scoped worker thread with the GIL released. The calling thread waits; every
/// [`POLL`] it takes the GIL to run Python's signal handlers (a pending Ctrl-C becomes
/// [`resid::interrupt::request`], which the engine honours between batches and decode steps)
/// and to call `progress(done, total)`. A Ctrl-C ends in `KeyboardInterrupt` once the work has
/// stopped and cleaned up; a panic in the library becomes `RuntimeError`, never a crash.
pub fn run<T: Send>(py: Python<'_>, progress: Option<&Bound<'_, PyAny>>, work: impl FnOnce(&Progress) -> resid::Result<T> + Send) -> PyResult<T> {
    let state = Progress::default();
    let progress = progress.map(|p| p.clone().unbind());
    let (result, interrupt) = py.detach(|| {
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<()>();
            let state = &state;
            let worker = s.spawn(move || {
                let r = work(state);
                let _ = tx.send(());
                r
            });
            let mut interrupt: Option<PyErr> = None;
            let mut shown = (usize::MAX, usize::MAX);
            let mut report = |final_: bool| {
                Python::attach(|py| {
                    if !final_ && interrupt.is_none() {
                        if let Err(e) = py.check_signals() {
                            resid::interrupt::request(resid::interrupt::SIGINT);
                            interrupt = Some(e);
                        }
                    }
                    if let Some(p) = &progress {
                        let now = (state.done.load(Ordering::Relaxed), state.total.load(Ordering::Relaxed));
                        if now != shown {
                            shown = now;
                            // A failing progress callback must not stop the work.
                            let _ = p.call1(py, now);
                        }
                    }
                });
            };
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(POLL) {
                report(false);
            }
            report(true);
            (worker.join(), interrupt)
        })
    });
    match (result, interrupt) {
        (Ok(Err(e @ resid::Error::Interrupted { .. })), _) => Err(to_py(e)),
        (_, Some(e)) => {
            resid::interrupt::clear();
            Err(e)
        }
        (Ok(r), None) => r.map_err(to_py),
        (Err(panic), None) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!("internal error in resid: {what}")))
        }
    }
}
