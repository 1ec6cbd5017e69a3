//! What the child sets on itself before `exec`: rlimits, the process cap,
//! and a pids cgroup per run where one is writable.

use super::*;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(super) type Resource = libc::__rlimit_resource_t;
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(super) type Resource = libc::c_int;

/// Everything the child applies between fork and exec, computed beforehand.
#[derive(Clone, Copy)]
pub(super) struct LimitPlan {
    pub(super) cpu_secs: u64,
    pub(super) memory_bytes: u64,
    pub(super) file_bytes: u64,
    /// None where the user's task count is unknown (no /proc).
    pub(super) nproc: Option<u64>,
    pub(super) cgroup_procs: Option<RawFd>,
}

impl LimitPlan {
    pub(super) fn new(limits: &SandboxLimits, cgroup_procs: Option<RawFd>) -> Self {
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
    pub(super) fn apply(&self) -> std::io::Result<()> {
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
pub(super) fn set_limit(resource: Resource, soft: u64, hard: u64) -> std::io::Result<()> {
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
pub(super) fn user_task_count(uid: libc::uid_t) -> Option<u64> {
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

/// A `pids` cgroup for one run, removed when dropped.
pub(super) struct RunCgroup {
    pub(super) dir: PathBuf,
    /// `cgroup.procs`, opened before fork; the child writes itself into it.
    pub(super) procs: std::fs::File,
    pub(super) kill_stragglers: bool,
}

impl RunCgroup {
    pub(super) fn create(base: &Path, max_procs: u64, kill_stragglers: bool) -> Option<Self> {
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
pub(super) fn probe_pids_cgroup() -> Option<PathBuf> {
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
