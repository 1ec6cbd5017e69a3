//! File and terminal output. Atomic file output: every artefact is written to a temp file in the target
//! directory and renamed into place, so a crash or a bad input never leaves a
//! half-written file that a later run (or a user) would mistake for a result.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Run `write` against a temp path next to `path`, then rename it onto `path`.
/// Errors name `path`, the file asked for, never the temp file; a failed
/// write removes the temp file (a killed one leaves `.xtf-tmp-*`, which the
/// next run in that directory removes: [`crate::outdir`]).
pub fn write_atomic_with<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // 0666 less the umask, as `File::create` gives (tempfile's default is 0600).
    #[cfg(unix)]
    let mode = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o666);
    let mut builder = tempfile::Builder::new();
    builder.prefix(".xtf-tmp-");
    #[cfg(unix)]
    builder.permissions(mode);
    let tmp = builder.tempfile_in(dir).map_err(|e| Error::io(path, e))?;
    write(tmp.path()).map_err(|e| match e {
        Error::Io { source, .. } => Error::io(path, source),
        other => {
            let text = other
                .to_string()
                .replace(&tmp.path().display().to_string(), "");
            let text = text.trim_start_matches([':', ' ']);
            Error::Msg(format!("{}: cannot write: {text}", path.display()))
        }
    })?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Write bytes atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))?;
        f.sync_all().map_err(|e| Error::io(tmp, e))
    })
}

/// Serialise `value` as pretty JSON and write it atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Msg(format!("{}: cannot serialise: {e}", path.display())))?;
    write_atomic(path, text.as_bytes())
}

/// Save named tensors as one safetensors file, atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    write_atomic_with(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(Error::from)
    })
}

/// Copy a file atomically (tokenizer files, config.json next to saved weights).
pub fn copy_atomic(src: &Path, dst: &Path) -> Result<()> {
    let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
    write_atomic(dst, &bytes)
}

/// Keep freed pages in the process. candle allocates and frees
/// activation-sized buffers on every op; mimalloc's default 10 ms purge hands
/// them back to the OS and the next op page-faults them in again (perf showed
/// ~15% of a CPU training step in the kernel's `clear_page`). Call once at
/// start-up from binaries that use mimalloc as the global allocator.
pub fn keep_freed_pages() {
    /// `mi_option_purge_delay` in mimalloc v2's `mi_option_e` (not exported by the -sys crate).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an allocator option is thread-safe and takes plain integers.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// A scalar tensor's value as f64, read on the CPU (Metal has no f64).
pub fn scalar_f64(t: &candle_core::Tensor) -> candle_core::Result<f64> {
    t.to_device(&candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()
}

/// Parse a JSON file, `None` when it does not exist.
pub fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| crate::error::Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| crate::error::Error::model(path, format!("invalid JSON: {e}")))
}

/// A progress bar with step, loss, tokens/s and ETA; hidden with `--quiet`.
/// When stderr is not a terminal (CI, `nohup`, a redirected log) it becomes
/// periodic log lines instead (see [`LogLines`]).
pub fn progress(len: u64, quiet: bool) -> indicatif::ProgressBar {
    progress_units(len, "steps", quiet)
}

/// A counting progress bar (e.g. examples of the scoring pass) with rate and ETA.
pub fn progress_units(len: u64, unit: &str, quiet: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let (target, template) = if std::io::stderr().is_terminal() {
        let t = "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} UNIT | {msg} | ETA {eta}";
        (indicatif::ProgressDrawTarget::stderr(), t)
    } else {
        let t = "{pos}/{len} UNIT | {msg} | elapsed {elapsed} | ETA {eta}";
        (LogLines::target(), t)
    };
    let style = indicatif::ProgressStyle::with_template(&template.replace("UNIT", unit))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .with_key(
            "eta",
            |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let eta = steady_eta(s.elapsed(), s.pos(), s.len().unwrap_or(0));
                let _ = match eta {
                    Some(d) => write!(w, "{:#}", indicatif::HumanDuration(d)),
                    None => write!(w, "?"),
                };
            },
        );
    indicatif::ProgressBar::with_draw_target(Some(len), target).with_style(style)
}

/// Remaining time at the average rate so far, `elapsed / pos · (len − pos)`;
/// `None` before the first unit.
///
/// Why not indicatif's `{eta}`: its rate estimate decays while no unit
/// completes, so after a long pause (the evaluation inside a training step)
/// it reported "2w" for one remaining step.
pub fn steady_eta(elapsed: std::time::Duration, pos: u64, len: u64) -> Option<std::time::Duration> {
    (pos > 0).then(|| elapsed.mul_f64(len.saturating_sub(pos) as f64 / pos as f64))
}

/// A "terminal" for indicatif that turns the bar into `tracing` lines, at
/// most one per `XTF_PROGRESS_SECS` (default 30) seconds. Without it
/// indicatif draws nothing when stderr is not a terminal, and a scoring pass
/// or training run that takes an hour would log nothing until it ends.
#[derive(Debug)]
struct LogLines {
    every: std::time::Duration,
    last: std::sync::Mutex<std::time::Instant>,
}

impl LogLines {
    fn target() -> indicatif::ProgressDrawTarget {
        let secs = std::env::var("XTF_PROGRESS_SECS")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .unwrap_or(30.0);
        // The bar's first draw (position 0, no rate yet) says nothing: the
        // first line comes one interval in.
        let me = LogLines {
            every: std::time::Duration::from_secs_f64(secs),
            last: std::sync::Mutex::new(std::time::Instant::now()),
        };
        indicatif::ProgressDrawTarget::term_like(Box::new(me))
    }

    fn emit(&self, line: &str) -> std::io::Result<()> {
        let line = line.trim();
        if line.is_empty() {
            return Ok(());
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= self.every {
            *last = std::time::Instant::now();
            tracing::info!("{line}");
        }
        Ok(())
    }
}

impl indicatif::TermLike for LogLines {
    fn width(&self) -> u16 {
        200
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.emit(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.emit(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}
