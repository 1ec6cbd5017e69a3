//! Supervising a run: the child's output pipes read without blocking, the
//! wall-clock deadline, the pass sentinel, and the outcome classified.

use super::*;

pub(super) struct Run {
    /// None when the wall-clock limit expired.
    pub(super) status: Option<ExitStatus>,
    pub(super) saw_marker: bool,
    pub(super) stderr_tail: Vec<u8>,
}

pub(super) const STDERR_TAIL: usize = 4096;

/// Pump stdout (looking for the marker) and stderr (keeping a tail) until the
/// child exits or the deadline passes, then kill the process group before the
/// child is reaped (so its pid, the group id, cannot have been reused).
pub(super) fn supervise(
    mut child: Child,
    deadline: Instant,
    marker: &[u8],
) -> std::io::Result<Run> {
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

pub(super) fn classify(run: Run) -> Outcome {
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

pub(super) fn signal_hint(sig: i32) -> &'static str {
    match sig {
        libc::SIGXCPU => " (CPU time limit)",
        libc::SIGKILL => " (SIGKILL: CPU hard limit or out of memory)",
        libc::SIGSEGV => " (segmentation fault)",
        libc::SIGXFSZ => " (file size limit)",
        _ => "",
    }
}

/// Keep the last `STDERR_TAIL` bytes.
pub(super) fn keep_tail(tail: &mut Vec<u8>, bytes: &[u8]) {
    tail.extend_from_slice(bytes);
    if tail.len() > 2 * STDERR_TAIL {
        tail.drain(..tail.len() - STDERR_TAIL);
    }
}

/// Finds the marker in a byte stream read in arbitrary chunks, keeping only
/// `marker.len() - 1` bytes between chunks, so output size does not matter.
pub(super) struct MarkerScan<'a> {
    pub(super) marker: &'a [u8],
    pub(super) carry: Vec<u8>,
    pub(super) found: bool,
}

impl<'a> MarkerScan<'a> {
    pub(super) fn new(marker: &'a [u8]) -> Self {
        Self {
            marker,
            carry: Vec::new(),
            found: false,
        }
    }
    pub(super) fn feed(&mut self, bytes: &[u8]) {
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
pub(super) struct Pipe(Option<OwnedFd>);

impl Pipe {
    pub(super) fn new(fd: Option<OwnedFd>) -> std::io::Result<Self> {
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
    pub(super) fn fd(&self) -> Option<RawFd> {
        self.0.as_ref().map(|f| f.as_raw_fd())
    }
    pub(super) fn open(&self) -> bool {
        self.0.is_some()
    }
    /// Read what is available now, at most 1 MiB so a flood of output cannot
    /// keep the caller from checking the clock; close on EOF or error.
    pub(super) fn read_into(&mut self, mut sink: impl FnMut(&[u8])) {
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
pub(super) fn poll_fds(fds: &[Option<RawFd>], timeout: Duration) {
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
pub(super) fn has_exited(pid: libc::pid_t) -> bool {
    // SAFETY: zeroed siginfo_t is a valid out-parameter for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    let rc = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
    // SAFETY: si_pid is set by waitid (0 when the child is still running).
    rc != 0 || unsafe { info.si_pid() } != 0
}

/// A pidfd becomes readable when the process exits (Linux >= 5.3).
#[cfg(target_os = "linux")]
pub(super) fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: plain system call; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(not(target_os = "linux"))]
pub(super) fn pidfd_open(_pid: libc::pid_t) -> Option<OwnedFd> {
    None
}
