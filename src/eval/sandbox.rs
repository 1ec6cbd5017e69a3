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

// ------------------------------------------------------------ bootstrap

/// The Python that runs first in every run (`python -I -B -c BOOTSTRAP
/// <kernel 0|1> <hook 0|1> <prog.py>`, working directory = the run's
/// temporary directory): layer 1 (read-only mounts, then no capabilities)
/// when asked, layer 2 (the audit hook) when asked, then `prog.py` as
/// `__main__`. A blocked operation writes `SandboxError: ...` to fd 2 and
/// `_exit(1)`s at once, so no `except` in the program can swallow it and
/// the sentinel at the end of `prog.py` is never reached. A setup that
/// fails does the same, so a run never proceeds with less isolation than
/// it was asked for.
const BOOTSTRAP: &str = r##"import os, sys


def _xtf_deny(what, event, args):
    # Never returns, whatever the arguments' repr does.
    try:
        detail = repr(args)
        if len(detail) > 200:
            detail = detail[:200] + '...'
        msg = 'SandboxError: %s: %s%s\n' % (what, event, detail)
        os.write(2, msg.encode('utf-8', 'backslashreplace'))
    except BaseException:
        os.write(2, b'SandboxError: ' + what.encode() + b': ' + event.encode() + b'\n')
    finally:
        os._exit(1)


def _xtf_readonly_mounts():
    # Layer 1, in the mount namespace `unshare --mount` made: every mount
    # read-only (and nodev) except the run directory, a fresh /proc for the
    # PID namespace, then all capabilities dropped so nothing is remounted.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def mount(src, dst, fs, flags):
        if libc.mount(src, dst, fs, flags, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, 'mount %s: %s' % (dst.decode(), os.strerror(err)))

    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC = 1, 2, 4, 8, 32, 4096, 16384
    PRIVATE = 1 << 18
    KEEP = {b'nosuid': NOSUID, b'nodev': NODEV, b'noexec': NOEXEC, b'noatime': 1024,
            b'nodiratime': 2048, b'relatime': 1 << 21, b'nosymfollow': 256}
    root = os.path.realpath(os.getcwd()).encode()
    mount(b'none', b'/', None, REC | PRIVATE)
    mount(b'proc', b'/proc', b'proc', NOSUID | NODEV | NOEXEC)
    mount(root, root, None, BIND)
    mount(None, root, None, REMOUNT | BIND | NOSUID | NODEV | NOEXEC)
    devices = [d for d in (b'/dev/null', b'/dev/zero', b'/dev/full', b'/dev/random',
                           b'/dev/urandom') if os.path.exists(d)]
    for d in devices:
        mount(d, d, None, BIND)
    os.chdir(root)
    with open('/proc/self/mountinfo', 'rb') as f:
        rows = [line.split(b' ') for line in f.read().splitlines()]
    for row in rows:
        point = row[4]
        for esc in (b'\\040', b'\\011', b'\\012', b'\\134'):
            point = point.replace(esc, bytes([int(esc[1:], 8)]))
        if point == root:
            continue
        flags = REMOUNT | BIND | RDONLY
        for opt in row[5].split(b','):
            flags |= KEEP.get(opt, 0)
        if point not in devices:
            flags |= NODEV
        try:
            mount(None, point, None, flags)
        except OSError as e:
            if e.errno not in (2, 13):  # ENOENT, EACCES: unreachable, so unwritable
                raise
    for cap in range(64):  # PR_CAPBSET_DROP until EINVAL
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            break
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
        raise OSError(ctypes.get_errno(), 'capset')
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS


def _xtf_audit_hook(root):
    # Layer 2: an audit hook (it cannot be removed) that ends the run on a
    # write outside `root`, process creation, ctypes, sockets, rlimits.
    import posixpath, stat
    realpath, join, dirname, basename = (posixpath.realpath, posixpath.join,
                                         posixpath.dirname, posixpath.basename)
    fspath, fsdecode, getcwd, readlink, stat_, getpid = (
        os.fspath, os.fsdecode, os.getcwd, os.readlink, os.stat, os.getpid)
    S_ISDIR, deny = stat.S_ISDIR, _xtf_deny
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    prefix = root + '/'

    def fd_path(fd):
        path = readlink('/proc/self/fd/%d' % fd)
        if not path.startswith('/'):  # pipe:[...], socket:[...]: no path
            raise ValueError(path)
        return path

    def absolute(path, dir_fd=None):
        if isinstance(path, int):
            return fd_path(path)
        path = fsdecode(fspath(path))
        if path.startswith('/'):
            return path
        base = fd_path(dir_fd) if dir_fd is not None and dir_fd >= 0 else getcwd()
        return join(base, path)

    def inside(path):
        return path == root or path.startswith(prefix)

    def target(path, dir_fd=None):  # follows a final symlink
        return realpath(absolute(path, dir_fd))

    def entry(path, dir_fd=None):  # the directory entry itself
        p = absolute(path, dir_fd)
        return join(realpath(dirname(p)), basename(p))

    OUTSIDE = 'write outside the sandbox directory'

    def check_open(args):
        path, _mode, flags = args
        if isinstance(path, int):
            return True
        if flags & WRITE:
            p = fsdecode(fspath(path))
            if not p.startswith('/') and '..' in p.split('/'):
                return False
            t = target(path)
            return inside(t) or t == '/dev/null'
        # No directory fd outside: os.open(..., dir_fd=) is audited without it.
        try:
            st = stat_(path)
        except (OSError, ValueError):
            return True
        if S_ISDIR(st.st_mode) and not inside(target(path)):
            deny('directory handle outside the sandbox directory', 'open', args)
        return True

    def symlink_ok(args):
        src, dst, dir_fd = args[:3]
        link = entry(dst, dir_fd)
        s = fsdecode(fspath(src))
        return inside(link) and inside(realpath(s if s.startswith('/') else
                                                join(dirname(link), s)))

    WRITES = {
        'open': check_open,
        'os.remove': lambda a: inside(entry(a[0], a[1])),
        'os.rmdir': lambda a: inside(entry(a[0], a[1])),
        'os.mkdir': lambda a: inside(entry(a[0], a[2])),
        'os.rename': lambda a: inside(entry(a[0], a[2])) and inside(entry(a[1], a[3])),
        'os.link': lambda a: (inside(target(a[0], a[2])) and inside(entry(a[0], a[2]))
                              and inside(entry(a[1], a[3]))),
        'os.symlink': symlink_ok,
        'os.chmod': lambda a: inside(target(a[0], a[2])),
        'os.chown': lambda a: inside(target(a[0], a[3])),
        'os.utime': lambda a: inside(target(a[0], a[3])),
        'os.truncate': lambda a: inside(target(a[0])),
        'os.setxattr': lambda a: inside(target(a[0])),
        'os.removexattr': lambda a: inside(target(a[0])),
        'os.chflags': lambda a: inside(target(a[0])),
        'os.lchflags': lambda a: inside(target(a[0])),
        'shutil.rmtree': lambda a: inside(target(a[0], a[1] if len(a) > 1 else None)),
        'sqlite3.connect': lambda a: (fspath(a[0]) in (':memory:', '', b':memory:', b'')
                                      or inside(target(a[0]))),
    }
    BLOCKED = {
        'os.system': 'process creation', 'os.exec': 'process creation',
        'os.fork': 'process creation', 'os.forkpty': 'process creation',
        'os.posix_spawn': 'process creation', 'os.spawn': 'process creation',
        'subprocess.Popen': 'process creation', 'os.startfile': 'process creation',
        'socket.connect': 'network', 'socket.bind': 'network',
        'socket.sendto': 'network', 'socket.sendmsg': 'network',
        'socket.getaddrinfo': 'network', 'socket.gethostbyname': 'network',
        'socket.gethostbyaddr': 'network', 'socket.getnameinfo': 'network',
        'resource.setrlimit': 'resource limits',
    }

    CTYPES_HARMLESS = {'ctypes.addressof', 'ctypes.get_errno', 'ctypes.set_errno',
                       'ctypes.create_string_buffer', 'ctypes.create_unicode_buffer',
                       'ctypes.cdata/buffer'}

    def verdict(event, args):  # None, or why the event is blocked
        check = WRITES.get(event)
        if check is not None:
            return None if check(args) else OUTSIDE
        if event in BLOCKED:
            return BLOCKED[event] + ' is not allowed'
        if event.startswith('ctypes.'):
            # `import ctypes` (numpy imports it) opens the running program;
            # foreign calls, symbol look-ups, raw memory and libraries by
            # path are what would bypass this hook.
            if event == 'ctypes.dlopen' and (args[0] is None or '/' not in fsdecode(args[0])):
                return None
            return None if event in CTYPES_HARMLESS else 'ctypes is not allowed'
        if event == 'os.kill' or event == 'os.killpg':
            if args[0] not in (0, getpid()):
                return 'signals to other processes are not allowed'
        elif event == 'resource.prlimit' and len(args) > 2 and args[2] is not None:
            return 'resource limits are not allowed'
        return None

    def hook(event, args):
        try:
            why = verdict(event, args)
        except BaseException:
            why = 'sandbox check failed'
        if why is not None:
            deny(why, event, args)

    sys.addaudithook(hook)

    # Not audited: creating a FIFO or node, and the fork+exec primitive of
    # `subprocess` (whose own event the hook sees first).
    def guarded(name, original):
        def call(path, *args, **kwargs):
            if not inside(entry(path, kwargs.get('dir_fd'))):
                deny(OUTSIDE, 'os.' + name, (path,) + args)
            return original(path, *args, **kwargs)
        return call
    import posix
    for name in ('mkfifo', 'mknod'):
        if hasattr(posix, name):
            wrapped = guarded(name, getattr(posix, name))
            setattr(posix, name, wrapped)
            setattr(os, name, wrapped)
    try:
        import _posixsubprocess
    except ImportError:
        pass
    else:
        def fork_exec(*args):
            deny('process creation is not allowed', '_posixsubprocess.fork_exec', ())
        _posixsubprocess.fork_exec = fork_exec


def _xtf_main():
    kernel, hook, prog = sys.argv[1] == '1', sys.argv[2] == '1', sys.argv[3]
    try:
        if kernel:
            _xtf_readonly_mounts()
        if hook:
            if not hasattr(sys, 'addaudithook'):
                raise RuntimeError('Python >= 3.8 is needed for the audit hook')
            _xtf_audit_hook(os.path.realpath(os.getcwd()))
        with open(prog, 'rb') as f:
            source = f.read()
    except Exception as e:
        _xtf_deny('sandbox setup failed', type(e).__name__, (str(e),))
    import types
    main = types.ModuleType('__main__')
    main.__file__ = prog
    main.__builtins__ = __builtins__
    sys.modules['__main__'] = main
    sys.argv = [prog]
    exec(compile(source, prog, 'exec'), main.__dict__)


_xtf_main()
"##;

// ------------------------------------------------------------ supervision

struct Run {
    /// None when the wall-clock limit expired.
    status: Option<ExitStatus>,
    saw_marker: bool,
    stderr_tail: Vec<u8>,
}

const STDERR_TAIL: usize = 4096;

/// Pump stdout (looking for the marker) and stderr (keeping a tail) until the
/// child exits or the deadline passes, then kill the process group before the
/// child is reaped (so its pid, the group id, cannot have been reused).
fn supervise(mut child: Child, deadline: Instant, marker: &[u8]) -> std::io::Result<Run> {
    let mut out = Pipe::new(child.stdout.take().map(OwnedFd::from))?;
    let mut err = Pipe::new(child.stderr.take().map(OwnedFd::from))?;
    let pid = child.id() as libc::pid_t;
    let pidfd = pidfd_open(pid);
    let mut scan = MarkerScan::new(marker);
    let mut tail = Vec::new();
    let mut timed_out = false;
    loop {
        let now = Instant::now();
        if now >= deadline {
            timed_out = true;
            break;
        }
        // Without a pidfd, exit is noticed by polling every 10 ms.
        let wait = if pidfd.is_some() {
            deadline - now
        } else {
            (deadline - now).min(Duration::from_millis(10))
        };
        poll_fds(
            &[out.fd(), err.fd(), pidfd.as_ref().map(|f| f.as_raw_fd())],
            wait,
        );
        out.read_into(|b| scan.feed(b));
        err.read_into(|b| keep_tail(&mut tail, b));
        if has_exited(pid) {
            break;
        }
    }
    // SAFETY: plain system call; the group id is the unreaped child's pid.
    unsafe { libc::killpg(pid, libc::SIGKILL) };
    let status = child.wait()?;
    // Drain what is left; stop at EOF or after a short grace, in case a
    // process that escaped the group still holds the pipes.
    let grace = Instant::now() + Duration::from_millis(200);
    while (out.open() || err.open()) && Instant::now() < grace {
        poll_fds(&[out.fd(), err.fd(), None], Duration::from_millis(20));
        out.read_into(|b| scan.feed(b));
        err.read_into(|b| keep_tail(&mut tail, b));
    }
    Ok(Run {
        status: (!timed_out).then_some(status),
        saw_marker: scan.found,
        stderr_tail: tail,
    })
}

fn classify(run: Run) -> Outcome {
    let Some(status) = run.status else {
        return Outcome::TimedOut;
    };
    if status.success() && run.saw_marker {
        return Outcome::Passed;
    }
    if let Some(sig) = status.signal() {
        return Outcome::Crashed(format!("killed by signal {sig}{}", signal_hint(sig)));
    }
    let text = String::from_utf8_lossy(&run.stderr_tail);
    let last = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    // util-linux 2.38 `unshare --fork` cannot re-raise SIGKILL on itself and
    // exits 1 with this message instead.
    if last.starts_with("unshare: sigprocmask unblock failed") {
        return Outcome::Crashed(format!(
            "killed by signal {}{}",
            libc::SIGKILL,
            signal_hint(libc::SIGKILL)
        ));
    }
    let name = last.split(':').next().unwrap_or("").trim();
    let exception = name
        .rsplit('.')
        .next()
        .is_some_and(|n| n.ends_with("Error") || n.ends_with("Exception"));
    if exception && name != "AssertionError" {
        Outcome::Crashed(last.to_string())
    } else {
        Outcome::Failed
    }
}

fn signal_hint(sig: i32) -> &'static str {
    match sig {
        libc::SIGXCPU => " (CPU time limit)",
        libc::SIGKILL => " (SIGKILL: CPU hard limit or out of memory)",
        libc::SIGSEGV => " (segmentation fault)",
        libc::SIGXFSZ => " (file size limit)",
        _ => "",
    }
}

/// Keep the last `STDERR_TAIL` bytes.
fn keep_tail(tail: &mut Vec<u8>, bytes: &[u8]) {
    tail.extend_from_slice(bytes);
    if tail.len() > 2 * STDERR_TAIL {
        tail.drain(..tail.len() - STDERR_TAIL);
    }
}

/// Finds the marker in a byte stream read in arbitrary chunks, keeping only
/// `marker.len() - 1` bytes between chunks, so output size does not matter.
struct MarkerScan<'a> {
    marker: &'a [u8],
    carry: Vec<u8>,
    found: bool,
}

impl<'a> MarkerScan<'a> {
    fn new(marker: &'a [u8]) -> Self {
        Self {
            marker,
            carry: Vec::new(),
            found: false,
        }
    }
    fn feed(&mut self, bytes: &[u8]) {
        if self.found {
            return;
        }
        self.carry.extend_from_slice(bytes);
        self.found = self
            .carry
            .windows(self.marker.len())
            .any(|w| w == self.marker);
        let keep = self.marker.len().saturating_sub(1).min(self.carry.len());
        self.carry.drain(..self.carry.len() - keep);
    }
}

/// A non-blocking read end of a child pipe; None once it reached EOF.
struct Pipe(Option<OwnedFd>);

impl Pipe {
    fn new(fd: Option<OwnedFd>) -> std::io::Result<Self> {
        if let Some(fd) = &fd {
            // SAFETY: fcntl on an fd we own.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
            if flags < 0
                || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) }
                    < 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(Self(fd))
    }
    fn fd(&self) -> Option<RawFd> {
        self.0.as_ref().map(|f| f.as_raw_fd())
    }
    fn open(&self) -> bool {
        self.0.is_some()
    }
    /// Read what is available now, at most 1 MiB so a flood of output cannot
    /// keep the caller from checking the clock; close on EOF or error.
    fn read_into(&mut self, mut sink: impl FnMut(&[u8])) {
        let mut buf = [0u8; 16384];
        for _ in 0..64 {
            let Some(fd) = self.fd() else { return };
            // SAFETY: reading into a stack buffer of the given length.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                sink(&buf[..n as usize]);
                continue;
            }
            let e = std::io::Error::last_os_error();
            if n < 0
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                )
            {
                return;
            }
            self.0 = None;
        }
    }
}

/// Wait until one of `fds` is readable (or hung up) or `timeout` passes.
fn poll_fds(fds: &[Option<RawFd>], timeout: Duration) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .flatten()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    if pfds.is_empty() {
        std::thread::sleep(timeout);
        return;
    }
    // SAFETY: pfds is a valid array of pollfd of the given length.
    unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
}

/// Whether the child has terminated, without reaping it.
fn has_exited(pid: libc::pid_t) -> bool {
    // SAFETY: zeroed siginfo_t is a valid out-parameter for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    let rc = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
    // SAFETY: si_pid is set by waitid (0 when the child is still running).
    rc != 0 || unsafe { info.si_pid() } != 0
}

/// A pidfd becomes readable when the process exits (Linux >= 5.3).
#[cfg(target_os = "linux")]
fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: plain system call; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(not(target_os = "linux"))]
fn pidfd_open(_pid: libc::pid_t) -> Option<OwnedFd> {
    None
}

// ------------------------------------------------------------ child setup

#[cfg(all(target_os = "linux", target_env = "gnu"))]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
type Resource = libc::c_int;

/// Everything the child applies between fork and exec, computed beforehand.
#[derive(Clone, Copy)]
struct LimitPlan {
    cpu_secs: u64,
    memory_bytes: u64,
    file_bytes: u64,
    /// None where the user's task count is unknown (no /proc).
    nproc: Option<u64>,
    cgroup_procs: Option<RawFd>,
}

impl LimitPlan {
    fn new(limits: &SandboxLimits, cgroup_procs: Option<RawFd>) -> Self {
        // RLIMIT_NPROC counts every task of the real user, the caller's own
        // threads included: allow `max_procs` on top of what exists now. The
        // kernel ignores it for root, so root skips the /proc scan.
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        let nproc = (uid != 0)
            .then(|| user_task_count(uid))
            .flatten()
            .map(|n| n + limits.max_procs);
        Self {
            cpu_secs: limits.cpu_secs.max(1),
            memory_bytes: limits.memory_bytes,
            file_bytes: limits.file_bytes,
            nproc,
            cgroup_procs,
        }
    }

    /// Runs in the forked child: async-signal-safe system calls only.
    fn apply(&self) -> std::io::Result<()> {
        if let Some(fd) = self.cgroup_procs {
            // Writing "0" to cgroup.procs moves the writing process.
            // SAFETY: writing one byte from a static buffer.
            if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        set_limit(libc::RLIMIT_CPU, self.cpu_secs, self.cpu_secs + 1)?;
        set_limit(libc::RLIMIT_AS, self.memory_bytes, self.memory_bytes)?;
        set_limit(libc::RLIMIT_FSIZE, self.file_bytes, self.file_bytes)?;
        set_limit(libc::RLIMIT_CORE, 0, 0)?;
        if let Some(n) = self.nproc {
            set_limit(libc::RLIMIT_NPROC, n, n)?;
        }
        // Die with the caller rather than linger if it is killed mid-run.
        #[cfg(target_os = "linux")]
        // SAFETY: plain system call.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
        Ok(())
    }
}

/// Lower a limit (never above the current hard limit, which an unprivileged
/// process may not raise).
fn set_limit(resource: Resource, soft: u64, hard: u64) -> std::io::Result<()> {
    // SAFETY: getrlimit/setrlimit on a stack value.
    unsafe {
        let mut cur: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(resource, &mut cur) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hard = (hard as libc::rlim_t).min(cur.rlim_max);
        let new = libc::rlimit {
            rlim_cur: (soft as libc::rlim_t).min(hard),
            rlim_max: hard,
        };
        if libc::setrlimit(resource, &new) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Tasks (threads) owned by real user `uid`, from /proc; None without /proc.
fn user_task_count(uid: libc::uid_t) -> Option<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        if field("Uid:") == Some(u64::from(uid)) {
            total += field("Threads:").unwrap_or(1);
        }
    }
    Some(total)
}

// ---------------------------------------------------------- pids cgroup

/// A `pids` cgroup for one run, removed when dropped.
struct RunCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, opened before fork; the child writes itself into it.
    procs: std::fs::File,
    kill_stragglers: bool,
}

impl RunCgroup {
    fn create(base: &Path, max_procs: u64, kill_stragglers: bool) -> Option<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("xtf-sandbox-{}-{n}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        let procs =
            std::fs::write(dir.join("pids.max"), max_procs.max(1).to_string()).and_then(|_| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
            });
        match procs {
            Ok(procs) => Some(Self {
                dir,
                procs,
                kill_stragglers,
            }),
            Err(_) => {
                let _ = std::fs::remove_dir(&dir);
                None
            }
        }
    }
}

impl Drop for RunCgroup {
    /// Wait (briefly) for the cgroup to empty, killing what is left in it
    /// when asked to, then remove it. One that does not empty within a second
    /// stays behind as a stale directory (`rmdir` removes it once empty).
    fn drop(&mut self) {
        let procs = self.dir.join("cgroup.procs");
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            let pids = std::fs::read_to_string(&procs).unwrap_or_default();
            if pids.trim().is_empty() {
                break;
            }
            if self.kill_stragglers {
                for pid in pids
                    .lines()
                    .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
                {
                    // SAFETY: plain system call on a pid read from our cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The directory of this process's `pids` cgroup when we may create child
/// cgroups with a `pids.max` in it (cgroup v1 `pids` hierarchy, or cgroup v2
/// with `pids` in `cgroup.subtree_control`).
fn probe_pids_cgroup() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut candidates = Vec::new();
    for m in mounts.lines() {
        let f: Vec<&str> = m.split_whitespace().collect();
        let (Some(mnt), Some(kind), Some(opts)) = (f.get(1), f.get(2), f.get(3)) else {
            continue;
        };
        let own_path = |pred: &dyn Fn(&str) -> bool| {
            own.lines().find_map(|l| {
                let mut p = l.splitn(3, ':');
                let (_, ctrl, path) = (p.next()?, p.next()?, p.next()?);
                pred(ctrl).then(|| path.trim_start_matches('/').to_string())
            })
        };
        if *kind == "cgroup" && opts.split(',').any(|o| o == "pids") {
            if let Some(p) = own_path(&|c: &str| c.split(',').any(|x| x == "pids")) {
                candidates.push(Path::new(mnt).join(p));
            }
        } else if *kind == "cgroup2" {
            if let Some(p) = own_path(&|c: &str| c.is_empty()) {
                let dir = Path::new(mnt).join(p);
                let ctl =
                    std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
                if ctl.split_whitespace().any(|c| c == "pids") {
                    candidates.push(dir);
                }
            }
        }
    }
    candidates
        .into_iter()
        .find(|base| RunCgroup::create(base, 1, false).is_some())
}

// ---------------------------------------------------------------- probes

/// The `unshare` flags that work here, strongest first; empty when none do.
fn probe_unshare() -> Vec<&'static str> {
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
fn probe_read_only_mounts(unshare_flags: &[&str]) -> bool {
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
fn resolve_python(python: &Path) -> Option<PathBuf> {
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
fn output_within(mut cmd: Command, limit: Duration) -> Option<(bool, Vec<u8>)> {
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
