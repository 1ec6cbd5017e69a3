//! Running untrusted model-written Python (HumanEval) in a child process.
//!
//! **What isolation this provides — and what it does not** (the long form,
//! with the reasoning, is `docs/sandbox.md`). Each program runs as its own
//! `python3 -I -B` process, in a fresh temporary directory that is its
//! working directory, `$HOME` and `$TMPDIR`, with stdin closed, a cleared
//! environment, and these limits applied in the child before `exec`:
//!
//! - wall-clock timeout (default 3 s): on expiry the whole process group is
//!   killed with SIGKILL, so children and grandchildren die with it;
//! - `RLIMIT_CPU` (per process), `RLIMIT_AS` (address space per process),
//!   `RLIMIT_FSIZE` (largest file it may write), `RLIMIT_CORE` = 0;
//! - a process cap: `RLIMIT_NPROC` (set to the user's current task count plus
//!   `max_procs`; the kernel ignores it for root) and, where a writable `pids`
//!   cgroup exists (cgroup v1, or v2 with the controller delegated), a cgroup
//!   per run with `pids.max = max_procs`, which also holds for root;
//! - where `unshare --net --map-root-user` (util-linux) works: a new network
//!   namespace with only a downed loopback (no network at all) and, where
//!   available, a new PID namespace whose processes all die with its first
//!   process, so even children that leave the process group (`setsid`) are
//!   killed. Without `unshare` the program has the host's network.
//!
//! Writes to the file system outside the temporary directory are contained
//! by two layers; a run that attempts one does not pass and changes nothing:
//!
//! 1. **Read-only mounts (kernel)**, where `unshare --mount` works with the
//!    PID namespace (`isolation().filesystem`): in a private mount
//!    namespace every mount is remounted read-only and `nodev` except the
//!    temporary directory (bind-mounted onto itself, writable but `nosuid`,
//!    `nodev`, `noexec`) and five harmless devices (`/dev/null`, `zero`,
//!    `full`, `random`, `urandom`); `/proc` is the PID namespace's own, so
//!    `/proc/<pid>/root` of outside processes is out of reach; then every
//!    capability is dropped (bounding set included) and `no_new_privs` set,
//!    so the program cannot remount, and in any user namespace it creates
//!    the mounts are locked read-only. A write elsewhere fails with `EROFS`
//!    (or `EXDEV`), whatever code makes it.
//! 2. **Audit hook (interpreter)**, in every run (also without namespaces,
//!    e.g. in a CI container): before the program runs, a `sys.addaudithook`
//!    hook, which cannot be removed, ends the process at once (`SandboxError:
//!    ...` on stderr, exit 1, so `except` cannot swallow it and the pass
//!    sentinel is never printed) on: `open` for writing, `os.remove`,
//!    `rmdir`, `rename`/`replace`, `mkdir`, `chmod`, `chown`, `utime`,
//!    `truncate`, `link`, `symlink`, `setxattr`, `mkfifo`, `mknod`,
//!    `shutil.rmtree` and `sqlite3.connect` on a path outside the directory
//!    (symlinks resolved); opening a directory outside it (a `dir_fd` for
//!    `os.open`, which is audited without it); any process creation (`fork`,
//!    `exec*`, `posix_spawn`, `system`, `subprocess`); `ctypes` foreign calls,
//!    symbol look-ups, raw memory and libraries loaded by path (a bare
//!    `import ctypes` stays allowed: numpy does it); `socket.connect`/`bind`/
//!    `sendto`/`sendmsg` and name look-ups; `resource.setrlimit`; signals to
//!    other processes.
//!    Reads stay allowed. Python >= 3.8 is needed; older ones crash every run.
//!
//! `SandboxLimits::read_only_mounts` and `audit_hook` turn a layer off for
//! a run (the tests do, to prove each alone); `isolation()` reports (and
//! logs once) which kernel layers work on the machine at hand.
//!
//! It is **not** a security boundary against code written to escape. What
//! stays possible: **reading** anything the user can read (both layers
//! allow reads); with the hook alone, anything native code does (a C
//! extension calling `write`, `unlink` or `fork` itself is not audited),
//! races between the hook's path check and the operation (symlink swaps),
//! and tampering with the Python objects the hook relies on; with the
//! mounts, connecting to Unix-domain sockets and writing to FIFOs that exist
//! on the file system, and System V IPC (no IPC namespace). There is no
//! seccomp filter. Without the kernel layer the program runs as the calling
//! user with that user's permissions, and sees all processes. Nor is the
//! pass sentinel tamper-proof: a completion written to defeat the harness
//! can find the per-run nonce in its own code object. The harness is built
//! to score *mistaken* code — crashes, hangs, fork loops, runaway memory,
//! early `sys.exit(0)`, stray file writes — not malicious code. Run it in a
//! container or VM you are willing to lose when the model is untrusted.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::eval::tasks::EvalItem;

mod limits;
mod probes;
mod supervise;

use limits::*;
use probes::*;
use supervise::*;

/// Resource limits of one sandboxed run.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxLimits {
    /// Wall-clock limit; the process group is killed when it expires.
    pub wall: Duration,
    /// CPU seconds per process: SIGXCPU, then SIGKILL one second later. In a
    /// PID namespace the interpreter is the namespace's init, which the
    /// kernel shields from SIGXCPU, so there the SIGKILL ends it.
    pub cpu_secs: u64,
    /// Address-space limit per process, in bytes.
    pub memory_bytes: u64,
    /// Processes (threads included) the run may add: `pids.max` of its cgroup
    /// and the headroom of `RLIMIT_NPROC` over the user's current count.
    pub max_procs: u64,
    /// Largest file the program may write, in bytes (`RLIMIT_FSIZE`).
    pub file_bytes: u64,
    /// The interpreter; resolved once through `sys.executable`, so a pyenv
    /// shim does not cost a shell and a few processes per run.
    pub python: PathBuf,
    /// File-system layer 1 (kernel), used where `isolation().filesystem`:
    /// run in a mount namespace where every mount except the run's
    /// temporary directory is read-only. `false` turns it off for this run
    /// (tests use that to exercise layer 2 alone, as on a machine without
    /// user namespaces).
    pub read_only_mounts: bool,
    /// File-system layer 2 (interpreter), used everywhere: a Python audit
    /// hook that ends the run on a write outside the temporary directory, on
    /// process creation, `ctypes`, sockets and rlimit changes. `false` turns
    /// it off for this run (tests use that to exercise the kernel limits on
    /// processes, which the hook would otherwise stop first).
    pub audit_hook: bool,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            wall: Duration::from_secs(3),
            cpu_secs: 4,
            memory_bytes: 2 << 30,
            max_procs: 64,
            file_bytes: 16 << 20,
            python: PathBuf::from("python3"),
            read_only_mounts: true,
            audit_hook: true,
        }
    }
}

/// How one run ended. Everything but `Passed` counts as a failed sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0 and the per-run sentinel, printed after the last line of
    /// the program, was seen: the tests ran to the end without an exception.
    Passed,
    /// The program ended on its own without reaching the end: a failed
    /// `assert`, or an early `sys.exit`/`os._exit` of any status.
    Failed,
    /// Still running at the wall-clock limit; its process group was killed.
    TimedOut,
    /// Any other exception (the last line of stderr, e.g. `SyntaxError: ...`),
    /// death by signal (CPU limit, segfault), or a sandbox that failed to start.
    Crashed(String),
}

impl Outcome {
    pub fn is_passed(&self) -> bool {
        matches!(self, Outcome::Passed)
    }
}

/// The isolation layers available on this machine, probed once per process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// Runs in a new network namespace (`unshare --net --map-root-user`).
    pub network: bool,
    /// Runs in a new PID namespace (`unshare --pid --fork --kill-child`).
    pub pid_namespace: bool,
    /// A per-run `pids` cgroup caps the process count (also for root).
    pub pids_cgroup: bool,
    /// `RLIMIT_NPROC` binds: the real user id is not root.
    pub nproc_rlimit: bool,
    /// File-system layer 1 works here: a mount namespace (`unshare
    /// --mount`, which needs the PID namespace too) in which every mount
    /// but the run's temporary directory is remounted read-only and `nodev`,
    /// `/proc` is the PID namespace's own, and the program holds no
    /// capabilities (so it cannot remount). Probed by running the setup once
    /// with the default `python3`. Layer 2, the audit hook, is not probed:
    /// it is installed in every run unless `SandboxLimits::audit_hook` is
    /// false, and a run whose interpreter lacks it (Python < 3.8) crashes.
    pub filesystem: bool,
    unshare_flags: Vec<&'static str>,
    cgroup_base: Option<PathBuf>,
}

impl Isolation {
    /// Whether a fork loop is stopped by a process cap (not only by the timeout).
    pub fn process_limit(&self) -> bool {
        self.pids_cgroup || self.nproc_rlimit
    }
}

/// Probe (once) which isolation layers work here.
pub fn isolation() -> &'static Isolation {
    static ISO: OnceLock<Isolation> = OnceLock::new();
    ISO.get_or_init(|| {
        let unshare_flags = probe_unshare();
        let cgroup_base = probe_pids_cgroup();
        let filesystem = unshare_flags.contains(&"--pid") && probe_read_only_mounts(&unshare_flags);
        let iso = Isolation {
            network: !unshare_flags.is_empty(),
            pid_namespace: unshare_flags.contains(&"--pid"),
            pids_cgroup: cgroup_base.is_some(),
            // SAFETY: getuid cannot fail.
            nproc_rlimit: unsafe { libc::getuid() } != 0,
            filesystem,
            unshare_flags,
            cgroup_base,
        };
        tracing::info!(
            "sandbox isolation: read-only mounts {}, network namespace {}, PID namespace {}, \
             pids cgroup {}, RLIMIT_NPROC {}; Python audit hook in every run",
            iso.filesystem,
            iso.network,
            iso.pid_namespace,
            iso.pids_cgroup,
            iso.nproc_rlimit
        );
        iso
    })
}

/// Whether programs run without network access (see `isolation`).
pub fn network_isolation_available() -> bool {
    isolation().network
}

/// Whether `python` starts here (for tests and a clear error up front).
pub fn python_available(python: &Path) -> bool {
    resolve_python(python).is_some()
}

/// The HumanEval program for a completion: prompt + completion + "\n" + test
/// + "\ncheck(entry_point)\n". None for an item without test or entry point.
pub fn humaneval_program(item: &EvalItem, completion: &str) -> Option<String> {
    let (test, entry) = (item.test.as_deref()?, item.entry_point.as_deref()?);
    Some(format!(
        "{}{completion}\n{test}\ncheck({entry})\n",
        item.prompt
    ))
}

/// Run `program` under `limits` and classify how it ended. Never panics and
/// never outlives `limits.wall` by more than the cleanup (well under 1 s).
pub fn run_program(program: &str, limits: &SandboxLimits) -> Outcome {
    run_inner(program, limits).unwrap_or_else(|e| Outcome::Crashed(format!("sandbox: {e}")))
}

fn run_inner(program: &str, limits: &SandboxLimits) -> std::io::Result<Outcome> {
    let iso = isolation();
    let marker = format!("__XTF_PASSED_{}__", nonce());
    let dir = tempfile::Builder::new().prefix("xtf-sandbox-").tempdir()?;
    let prog = dir.path().join("prog.py");
    // The sentinel goes straight to fd 1: a completion that replaced `print`
    // or closed `sys.stdout` cannot make it appear.
    let harness = format!("\nimport os as __xtf_os\n__xtf_os.write(1, b\"\\n{marker}\\n\")\n");
    std::fs::write(&prog, format!("{program}{harness}"))?;

    let python = resolve_python(&limits.python).ok_or_else(|| {
        let msg = format!("{} does not start", limits.python.display());
        std::io::Error::new(std::io::ErrorKind::NotFound, msg)
    })?;
    let kernel = limits.read_only_mounts && iso.filesystem;
    let mut cmd = python_command(
        &python,
        &iso.unshare_flags,
        kernel,
        limits.audit_hook,
        dir.path(),
    );
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // Stragglers need killing by pid only where no PID namespace took them down.
    let cgroup = iso
        .cgroup_base
        .as_deref()
        .and_then(|base| RunCgroup::create(base, limits.max_procs, !iso.pid_namespace));
    let plan = LimitPlan::new(limits, cgroup.as_ref().map(|c| c.procs.as_raw_fd()));
    // SAFETY: the closure only makes async-signal-safe system calls
    // (getrlimit, setrlimit, prctl, write) on values prepared before fork.
    unsafe {
        cmd.pre_exec(move || plan.apply());
    }
    let child = cmd.spawn()?;
    let run = supervise(child, Instant::now() + limits.wall, marker.as_bytes());
    drop(cgroup);
    Ok(classify(run?))
}

/// The command that runs `prog.py` in `dir` through `BOOTSTRAP`: under
/// `unshare` when `unshare_flags` is not empty (with `--mount` added for
/// layer 1), with stdin closed and a cleared environment.
fn python_command(
    python: &Path,
    unshare_flags: &[&str],
    kernel: bool,
    hook: bool,
    dir: &Path,
) -> Command {
    let mut cmd = if unshare_flags.is_empty() {
        Command::new(python)
    } else {
        let mut c = Command::new("unshare");
        c.args(unshare_flags);
        if kernel {
            c.arg("--mount");
        }
        c.arg("--").arg(python);
        c
    };
    let flag = |on: bool| if on { "1" } else { "0" };
    cmd.args(["-I", "-B", "-c", BOOTSTRAP, flag(kernel), flag(hook)])
        .arg(dir.join("prog.py"))
        .current_dir(dir)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("HOME", dir)
        .env("TMPDIR", dir)
        .env("LC_ALL", "C.UTF-8")
        .stdin(Stdio::null());
    cmd
}

/// 128 random bits as hex, from the kernel; the std hasher's random keys
/// when /dev/urandom is unreadable.
fn nonce() -> String {
    let mut bytes = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if ok.is_err() {
        use std::hash::{BuildHasher, Hasher};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        for chunk in bytes.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Python that runs first in every run (`python -I -B -c BOOTSTRAP
/// <kernel 0|1> <hook 0|1> <prog.py>`, working directory = the run's
/// temporary directory): layer 1 (read-only mounts, then no capabilities)
/// when asked, layer 2 (the audit hook) when asked, then `prog.py` as
/// `__main__`. A blocked operation writes `SandboxError: ...` to fd 2 and
/// `_exit(1)`s at once, so no `except` in the program can swallow it and
/// the sentinel at the end of `prog.py` is never reached. A setup that
/// fails does the same, so a run never proceeds with less isolation than
/// it was asked for.
const BOOTSTRAP: &str = include_str!("bootstrap.py");
