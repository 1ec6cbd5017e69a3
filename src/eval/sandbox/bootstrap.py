import os, sys


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
