//! File and terminal output. Atomic file output: every artefact is written to a temp file in the target
//! directory and renamed into place, so a crash or a bad input never leaves a
//! half-written file that a later run (or a user) would mistake for a result.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Run `write` against a temp path next to `path`, then rename it onto `path`.
pub fn write_atomic_with<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".xtf-tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    write(tmp.path())?;
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

/// A progress bar with step, loss, tokens/s and ETA; hidden with `--quiet`
/// or when stderr is not a terminal.
pub fn progress(len: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps | {msg} | ETA {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// A counting progress bar (e.g. examples of the scoring pass) with rate and ETA.
pub fn progress_units(len: u64, unit: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let template = format!("{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit} | {{msg}} | ETA {{eta}}");
    bar.set_style(
        indicatif::ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
