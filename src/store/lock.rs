//! Exclusive advisory locks on outputs, and removal of what dead runs left behind.
//!
//! A lock is `flock` on a lock file: the kernel drops it when its holder dies, however it
//! dies, so a lock never outlives a killed run. The holder writes its pid into the file, so a
//! second writer can name it. On release the holder removes the file while still holding it;
//! a waiter that then wins the lock of the removed file notices (the path no longer names the
//! file it locked) and locks the new one instead, so two runs never both hold "the" lock.
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Lock file of a directory output.
pub const DIR_LOCK: &str = ".resid.lock";

/// An exclusive lock on an output, held until dropped.
#[derive(Debug)]
pub struct OutputLock {
    file: File,
    lock_path: PathBuf,
}

impl OutputLock {
    /// Locks directory `dir` (which must exist) through `dir/.resid.lock`.
    pub fn dir(dir: &Path, wait: bool) -> Result<Self> {
        Self::acquire(&dir.join(DIR_LOCK), dir, wait)
    }

    /// Locks the output file `path` through `.NAME.lock` beside it (other files in the same
    /// directory stay free).
    pub fn file(path: &Path, wait: bool) -> Result<Self> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
        Self::acquire(&path.with_file_name(format!(".{name}.lock")), path, wait)
    }

    /// Locks through `lock_path`; errors name `what`. Without `wait`, a lock held elsewhere is
    /// [`Error::Locked`] at once; with it, this waits (and says so once on stderr).
    pub fn acquire(lock_path: &Path, what: &Path, wait: bool) -> Result<Self> {
        let mut said = false;
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(lock_path)
                .map_err(|e| Error::io(lock_path, e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let holder = read_pid(&mut file);
                    if !wait {
                        return Err(Error::Locked { path: what.to_owned(), holder });
                    }
                    if !said {
                        let who = holder.map_or("another resid run".to_string(), |p| format!("resid pid {p}"));
                        eprintln!("{}: in use by {who}; waiting for it to finish", what.display());
                        said = true;
                    }
                    file.lock().map_err(|e| Error::io(lock_path, e))?;
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(lock_path, e)),
            }
            if same_file(&file, lock_path) {
                file.set_len(0).map_err(|e| Error::io(lock_path, e))?;
                file.rewind().map_err(|e| Error::io(lock_path, e))?;
                writeln!(file, "{}", std::process::id()).map_err(|e| Error::io(lock_path, e))?;
                crate::io::track_temp_file(lock_path);
                return Ok(OutputLock { file, lock_path: lock_path.to_owned() });
            }
            // The holder removed the file between our open and our lock: lock the new one.
        }
    }

    pub fn lock_path(&self) -> &Path {
        &self.lock_path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked (see the module comment); the lock goes with the handle.
        let _ = std::fs::remove_file(&self.lock_path);
        crate::io::untrack_temp_file(&self.lock_path);
        let _ = self.file.unlock();
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &File, path: &Path) -> bool {
    path.exists()
}

/// Removes the temporary files (`.NAME.PID.tmp`, see [`crate::io::AtomicPath`]) that other
/// processes left in `dir`, optionally only those of the output named `only`. Call it while
/// holding the lock that covers every writer of those files: any such file is then a dead
/// run's, or the probe of a run refused the lock (which removes it itself, maybe first).
/// Returns what was removed.
pub fn remove_stale_temp_files(dir: &Path, only: Option<&str>) -> Result<Vec<PathBuf>> {
    let me = std::process::id();
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = crate::io::temp_owner(&name) else { continue };
        if pid == me || only.is_some_and(|o| !name.starts_with(&format!(".{o}."))) {
            continue;
        }
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let path = entry.path();
            if remove_if_present(&path)? {
                removed.push(path);
            }
        }
    }
    removed.sort();
    Ok(removed)
}

/// Removes `path`; false if it was already gone. A run refused the lock still probes the
/// output with a temporary file of its own ([`crate::io::check_writable`]) and removes it: when
/// that happened between the holder's listing and its removal, the holder failed on "No such
/// file or directory" and both runs exited 6 (1 in 10 of `concurrent_writers_started_together`).
fn remove_if_present(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Locks a directory output for a whole run: creates it, locks it and removes dead runs'
/// temporary files from it and from its subdirectories `subdirs`.
pub fn lock_output_dir(dir: &Path, wait: bool, subdirs: &[&str]) -> Result<OutputLock> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::NotADirectory, "exists and is not a directory")));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let lock = OutputLock::dir(dir, wait)?;
    remove_stale_temp_files(dir, None)?;
    for sub in subdirs {
        remove_stale_temp_files(&dir.join(sub), None)?;
    }
    Ok(lock)
}

/// Locks a single output file for a whole run: checks that it can be created, locks it and
/// removes dead runs' temporary files of it.
pub fn lock_output_file(path: &Path, wait: bool) -> Result<OutputLock> {
    crate::io::check_writable(path)?;
    let lock = OutputLock::file(path, wait)?;
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        remove_stale_temp_files(dir, Some(&name.to_string_lossy()))?;
    }
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_names_the_holder_and_is_free_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let a = OutputLock::dir(dir.path(), false).unwrap();
        // flock locks belong to open file descriptions: a second open in the same process
        // conflicts just as another process would.
        match OutputLock::dir(dir.path(), false) {
            Err(Error::Locked { holder, path }) => {
                assert_eq!(holder, Some(std::process::id()));
                assert_eq!(path, dir.path());
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(a);
        assert!(!dir.path().join(DIR_LOCK).exists(), "the lock file is removed on release");
        let _b = OutputLock::dir(dir.path(), false).unwrap();
    }

    #[test]
    fn a_waiter_gets_the_lock_when_the_holder_releases_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = OutputLock::dir(dir.path(), false).unwrap();
        let path = dir.path().to_owned();
        let waiter = std::thread::spawn(move || OutputLock::dir(&path, true).map(|l| l.lock_path().to_owned()));
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!waiter.is_finished(), "the waiter must block while the lock is held");
        drop(a);
        let got = waiter.join().unwrap().unwrap();
        assert_eq!(got, dir.path().join(DIR_LOCK));
    }

    #[test]
    fn stale_temp_files_of_other_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mine = format!(".a.safetensors.{}.tmp", std::process::id());
        for name in [".a.safetensors.4000001.tmp", ".b.png.4000002.tmp.png", &mine, "keep.tmp", ".x.tmp", "shard-00000.safetensors"] {
            std::fs::write(d.join(name), b"x").unwrap();
        }
        let removed = remove_stale_temp_files(d, Some("a.safetensors")).unwrap();
        assert_eq!(removed, vec![d.join(".a.safetensors.4000001.tmp")]);
        let removed = remove_stale_temp_files(d, None).unwrap();
        assert_eq!(removed, vec![d.join(".b.png.4000002.tmp.png")]);
        let mut left: Vec<String> = std::fs::read_dir(d).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, vec![mine.clone(), ".x.tmp".to_string(), "keep.tmp".to_string(), "shard-00000.safetensors".to_string()]);
    }

    /// A temporary file that its owner removed meanwhile is not an error (the holder of a lock
    /// lists another run's probe, which that run then removes); other failures are, naming the
    /// path.
    #[test]
    fn a_temp_file_gone_before_its_removal_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join(".a.safetensors.4000001.tmp");
        assert!(!remove_if_present(&gone).unwrap(), "already gone: nothing removed");
        std::fs::write(&gone, b"x").unwrap();
        assert!(remove_if_present(&gone).unwrap());
        assert!(!gone.exists());
        let not_a_file = dir.path().join("sub");
        std::fs::create_dir(&not_a_file).unwrap();
        let err = remove_if_present(&not_a_file).unwrap_err().to_string();
        assert!(err.contains("sub"), "{err}");
    }
}
