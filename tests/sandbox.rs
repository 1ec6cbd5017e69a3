//! The HumanEval sandbox against misbehaving programs. Each test states what
//! it protects; those that need python3 skip (with a message) without it.

use std::time::{Duration, Instant};
use xtf_train::sandbox::{self, isolation, run_program, Outcome, SandboxLimits};

fn limits() -> Option<SandboxLimits> {
    let limits = SandboxLimits {
        wall: Duration::from_secs(2),
        ..Default::default()
    };
    if sandbox::python_available(&limits.python) {
        Some(limits)
    } else {
        eprintln!("skipping: {} does not run", limits.python.display());
        None
    }
}

/// A unique token for process and file names, so tests can find their own.
fn token() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}{}", std::process::id(), t % 1_000_000_000)
}

/// Pids of live (non-zombie) processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'));
            !zombie && String::from_utf8_lossy(&cmd).contains(needle)
        })
        .collect()
}

/// Wait up to a second for processes to disappear (the kernel tears down
/// killed processes asynchronously).
fn survivors(needle: &str) -> Vec<u32> {
    let until = Instant::now() + Duration::from_secs(1);
    loop {
        let left = processes_with(needle);
        if left.is_empty() || Instant::now() > until {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Python that starts `sleep <marker>` in a forked child (optionally in a
/// new session, outside the process group) and returns in the parent.
fn spawn_sleeper(marker: &str, setsid: bool) -> String {
    let setsid = if setsid { "os.setsid()\n        " } else { "" };
    format!(
        "import os, shutil\n\
         def sleeper():\n    \
             if os.fork() == 0:\n        \
                 {setsid}os.execv(shutil.which('sleep'), ['sleep', '{marker}'])\n        \
                 os._exit(1)\n\
         sleeper()\n"
    )
}

#[test]
fn isolation_report_is_printed() {
    // Not an assertion: the facts the README quotes, visible with --nocapture.
    eprintln!("{:#?}", isolation());
}

#[test]
fn passing_program_passes() {
    let Some(l) = limits() else { return };
    assert_eq!(run_program("x = 1\nassert x == 1\n", &l), Outcome::Passed);
    // no trailing newline, and a block left open at the end
    assert_eq!(run_program("def f():\n    return 1", &l), Outcome::Passed);
}

#[test]
fn infinite_loop_times_out_within_wall_plus_one_second() {
    let Some(l) = limits() else { return };
    let start = Instant::now();
    assert_eq!(
        run_program("while True:\n    pass\n", &l),
        Outcome::TimedOut
    );
    let took = start.elapsed();
    assert!(took < l.wall + Duration::from_secs(1), "took {took:?}");
    assert!(took >= l.wall, "returned before the limit: {took:?}");
}

#[test]
fn exceptions_crash_and_failed_asserts_fail() {
    let Some(l) = limits() else { return };
    match run_program("raise Exception('boom')\n", &l) {
        Outcome::Crashed(msg) => assert_eq!(msg, "Exception: boom"),
        other => panic!("expected Crashed, got {other:?}"),
    }
    match run_program("def f(:\n", &l) {
        Outcome::Crashed(msg) => assert!(msg.starts_with("SyntaxError"), "{msg}"),
        other => panic!("expected Crashed, got {other:?}"),
    }
    assert_eq!(run_program("assert 1 == 2, 'wrong'\n", &l), Outcome::Failed);
    assert_eq!(
        run_program("import sys\nsys.exit(3)\n", &l),
        Outcome::Failed
    );
}

#[test]
fn early_exit_zero_is_not_a_pass() {
    let Some(l) = limits() else { return };
    let test = "\ndef check(f):\n    assert f() == 2\ncheck(f)\n";
    for early in [
        "import sys; sys.exit(0)\n",
        "import os; os._exit(0)\n",
        "quit()\n",
        "raise SystemExit\n",
    ] {
        let program = format!("{early}def f():\n    return 1\n{test}");
        assert_eq!(run_program(&program, &l), Outcome::Failed, "{early}");
    }
    // and the same program without the early exit really does fail its test
    let program = format!("def f():\n    return 1\n{test}");
    assert_eq!(run_program(&program, &l), Outcome::Failed);
}

#[test]
fn faked_sentinel_does_not_pass() {
    let Some(l) = limits() else { return };
    for fake in [
        "print('__XTF_PASSED__')",
        "print('\\n__XTF_PASSED_00000000000000000000000000000000__')",
        "import os; os.write(1, b'__XTF_PASSED_' + b'0' * 32 + b'__\\n')",
    ] {
        let program = format!("{fake}\nimport os; os._exit(0)\n");
        assert_eq!(run_program(&program, &l), Outcome::Failed, "{fake}");
    }
    // Silencing stdout makes a correct program fail, never pass.
    let program = "import sys, os\nsys.stdout.close()\nos.close(1)\n";
    assert!(!run_program(program, &l).is_passed());
}

#[test]
fn bounded_fork_loop_is_capped_where_a_process_limit_binds() {
    let Some(l) = limits() else { return };
    let marker = format!("61.{}", token());
    // 200 > max_procs (64): a cap stops the loop with BlockingIOError.
    let program = format!(
        "import os, shutil\n\
         n = 0\n\
         try:\n    \
             for _ in range(200):\n        \
                 if os.fork() == 0:\n            \
                     os.execv(shutil.which('sleep'), ['sleep', '{marker}'])\n            \
                     os._exit(1)\n        \
                 n += 1\n\
         except OSError:\n    \
             pass\n\
         assert n < 200, n\n"
    );
    let outcome = run_program(&program, &l);
    let capped = isolation().process_limit();
    eprintln!("fork loop: {outcome:?} (process cap active: {capped})");
    let want = if capped {
        Outcome::Passed
    } else {
        Outcome::Failed
    };
    assert_eq!(outcome, want);
    // Whatever got forked dies with the run.
    assert_eq!(survivors(&marker), Vec::<u32>::new());
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let Some(l) = limits() else { return };
    let marker = format!("62.{}", token());
    let program = format!("{}while True:\n    pass\n", spawn_sleeper(&marker, false));
    assert_eq!(run_program(&program, &l), Outcome::TimedOut);
    assert_eq!(survivors(&marker), Vec::<u32>::new());
}

#[test]
fn children_that_leave_the_group_die_where_a_namespace_or_cgroup_holds_them() {
    let Some(l) = limits() else { return };
    let marker = format!("63.{}", token());
    let program = spawn_sleeper(&marker, true);
    assert_eq!(run_program(&program, &l), Outcome::Passed);
    let left = survivors(&marker);
    let iso = isolation();
    if iso.pid_namespace || iso.pids_cgroup {
        assert_eq!(left, Vec::<u32>::new());
    } else {
        eprintln!(
            "NOTE: without a PID namespace or pids cgroup, a setsid() child outlives the run"
        );
        assert!(!left.is_empty());
        for pid in left {
            // SAFETY: killing the sleeper this test started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

#[test]
fn writes_outside_the_temp_dir_are_not_prevented() {
    // The rlimit sandbox has no file-system isolation (see the module docs):
    // the program can create a file anywhere its user can. What this test
    // protects is that such a program is still scored on its tests alone.
    let Some(l) = limits() else { return };
    let target = std::env::temp_dir().join(format!("xtf-sandbox-escape-{}", token()));
    let program = format!(
        "open({:?}, 'w').write('escaped')\ndef f():\n    return 2\nassert f() == 2\n",
        target.display().to_string()
    );
    assert_eq!(run_program(&program, &l), Outcome::Passed);
    let escaped = target.exists();
    let _ = std::fs::remove_file(&target);
    eprintln!("write to {}: escaped = {escaped}", target.display());
    assert_eq!(escaped, !isolation().filesystem);
}

#[test]
fn file_size_limit_stops_large_writes() {
    let Some(l) = limits() else { return };
    let program = format!(
        "import errno\n\
         try:\n    \
             open('big', 'wb').write(b'x' * {})\n    \
             raise SystemExit('no limit')\n\
         except OSError as e:\n    \
             assert e.errno == errno.EFBIG, e\n",
        l.file_bytes + (1 << 20)
    );
    assert_eq!(run_program(&program, &l), Outcome::Passed);
}

#[test]
fn memory_limit_raises_memory_error() {
    let Some(l) = limits() else { return };
    let program = format!(
        "try:\n    \
             x = bytearray({})\n    \
             raise SystemExit('no limit')\n\
         except MemoryError:\n    \
             pass\n",
        2 * l.memory_bytes
    );
    assert_eq!(run_program(&program, &l), Outcome::Passed);
}

#[test]
fn cpu_limit_kills_a_busy_loop_before_the_wall_clock() {
    let Some(l) = limits() else { return };
    // A wall limit far above the CPU limit: the run must end by the CPU
    // limit (1 s soft, 2 s hard), even on a loaded machine.
    let l = SandboxLimits {
        wall: Duration::from_secs(30),
        cpu_secs: 1,
        ..l
    };
    let start = Instant::now();
    let outcome = run_program("while True:\n    pass\n", &l);
    assert!(matches!(outcome, Outcome::Crashed(_)), "{outcome:?}");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(15), "{took:?}");
}

#[test]
fn huge_output_does_not_stall_the_caller() {
    let Some(l) = limits() else { return };
    let program = "import sys\nfor _ in range(400):\n    sys.stdout.write('y' * 100000 + '\\n')\n\
                   sys.stderr.write('e' * 1000000)\n";
    assert_eq!(run_program(program, &l), Outcome::Passed);
}

#[test]
fn network_is_unreachable_where_unshare_works() {
    let Some(l) = limits() else { return };
    if !sandbox::network_isolation_available() {
        eprintln!("NOTE: unshare --net --map-root-user does not work here: no network isolation");
        return;
    }
    let program = "import socket\nassert [n for _, n in socket.if_nameindex()] == ['lo']\n\
                   try:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    raise SystemExit(1)\n\
                   except OSError:\n    pass\n";
    assert_eq!(run_program(program, &l), Outcome::Passed);
    if isolation().pid_namespace {
        assert_eq!(
            run_program("import os\nassert os.getpid() == 1\n", &l),
            Outcome::Passed
        );
    }
}

#[test]
fn missing_interpreter_is_a_crash_not_a_panic() {
    let l = SandboxLimits {
        python: "/nonexistent/python3".into(),
        ..Default::default()
    };
    assert!(matches!(run_program("pass\n", &l), Outcome::Crashed(_)));
}
