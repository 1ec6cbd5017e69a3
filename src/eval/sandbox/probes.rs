//! Probes of what the machine allows (namespaces, read-only mounts, the
//! Python interpreter), run once.

use super::*;

/// The `unshare` flags that work here, strongest first; empty when none do.
pub(super) fn probe_unshare() -> Vec<&'static str> {
    const TIERS: [&[&str]; 2] = [
        &[
            "--net",
            "--map-root-user",
            "--pid",
            "--fork",
            "--kill-child",
        ],
        &["--net", "--map-root-user"],
    ];
    for flags in TIERS {
        let mut cmd = Command::new("unshare");
        cmd.args(flags).args(["--", "true"]);
        if output_within(cmd, Duration::from_secs(5)).is_some_and(|(ok, _)| ok) {
            return flags.to_vec();
        }
    }
    Vec::new()
}

/// Whether layer 1 works: the bootstrap, under `unshare_flags` plus
/// `--mount`, makes the parent of the temporary directory read-only
/// (`EROFS`) while the directory itself stays writable. Needs `python3`.
pub(super) fn probe_read_only_mounts(unshare_flags: &[&str]) -> bool {
    let Some(python) = resolve_python(Path::new("python3")) else {
        return false;
    };
    let Ok(dir) = tempfile::Builder::new()
        .prefix("xtf-sandbox-probe-")
        .tempdir()
    else {
        return false;
    };
    let Some(parent) = dir.path().parent() else {
        return false;
    };
    let outside = parent.join(format!("xtf-sandbox-probe-{}", nonce()));
    let program = format!(
        "import errno, os\n\
         open('inside', 'w').write('ok')\n\
         try:\n    \
             open({:?}, 'w')\n\
         except OSError as e:\n    \
             assert e.errno == errno.EROFS, e\n\
         else:\n    \
             raise SystemExit(1)\n\
         os.write(1, b'read-only')\n",
        outside.display().to_string()
    );
    if std::fs::write(dir.path().join("prog.py"), program).is_err() {
        return false;
    }
    let cmd = python_command(&python, unshare_flags, true, false, dir.path());
    let ok = output_within(cmd, Duration::from_secs(10))
        .is_some_and(|(ok, out)| ok && out == b"read-only");
    let escaped = outside.exists();
    if escaped {
        let _ = std::fs::remove_file(&outside);
    }
    ok && !escaped && dir.path().join("inside").exists()
}

/// `sys.executable` of `python`, cached per path; None if it does not start.
pub(super) fn resolve_python(python: &Path) -> Option<PathBuf> {
    static CACHE: OnceLock<Mutex<std::collections::HashMap<PathBuf, Option<PathBuf>>>> =
        OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().ok()?.get(python) {
        return hit.clone();
    }
    let mut cmd = Command::new(python);
    cmd.args(["-c", "import sys; print(sys.executable)"]);
    let found = output_within(cmd, Duration::from_secs(20)).and_then(|(ok, out)| {
        let exe = PathBuf::from(String::from_utf8_lossy(&out).trim());
        (ok && exe.is_absolute() && exe.exists()).then_some(exe)
    });
    cache
        .lock()
        .ok()?
        .insert(python.to_path_buf(), found.clone());
    found
}

/// Run a probe command with a timeout: (success, stdout) or None.
pub(super) fn output_within(mut cmd: Command, limit: Duration) -> Option<(bool, Vec<u8>)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .ok()?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = Vec::new();
                child.stdout.take()?.read_to_end(&mut out).ok()?;
                return Some((status.success(), out));
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}
