"""Child side of ``aquila_npu.evaluation.sandbox``: confine this process, then run the program.

Run as a script (``python -I -S -B sandbox_launcher.py CONFIG_JSON``) in a fresh session and temporary working
directory by ``sandbox.run_program``; it imports nothing of aquila_npu. Every layer is applied where the kernel and
the process's rights allow it, and the list of layers applied is written (one JSON line) to the status pipe before
the program starts:

1. namespaces: a new user namespace (the process keeps its user id but holds no capability outside it), network
   namespace (no interface but a down loopback: no network) and PID namespace (the program is process 1 of its own
   namespace: it cannot see or signal anything outside, and everything in it dies with it);
2. resource limits: address space, file size, CPU seconds, no core files, open files, and (for a non-root user)
   processes;
3. no capabilities (bounding set and sets emptied when running as root) and ``no_new_privs``;
4. Landlock: reads only of the Python installation, the system libraries and the working directory; writes only
   inside the working directory (and /dev/null); no TCP bind/connect; signals and abstract UNIX sockets scoped to
   the sandbox;
5. seccomp: fork, vfork, clone without CLONE_THREAD, clone3, socket, socketpair, ptrace and process_vm_readv/writev
   fail (threads still work).

Then it execs the interpreter (``-I -S -B``) on a small wrapper that runs the program as ``__main__`` and, in the
``completes`` mode, writes "ok" to the status pipe when the program ran to its end without raising.
"""

import ctypes
import errno
import json
import os
import platform
import resource
import sys

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID, CLONE_THREAD = 0x10000000, 0x40000000, 0x20000000, 0x00010000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_CAPBSET_DROP, SECCOMP_MODE_FILTER = 1, 38, 22, 24, 2

# Landlock (include/uapi/linux/landlock.h)
SYS_LANDLOCK = (444, 445, 446)  # create_ruleset, add_rule, restrict_self (same numbers on x86_64 and aarch64)
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_WRITE_DIR = sum(1 << b for b in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/block/sym
FS_REFER, FS_TRUNCATE = 1 << 13, 1 << 14
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1 << 0, 1 << 1
READ_PATHS = ("/lib", "/lib32", "/lib64", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache",
              "/etc/localtime", "/usr/share/zoneinfo", "/dev/urandom")

# seccomp: (AUDIT_ARCH, {name: number}) per machine
SYSCALLS = {
    "x86_64": (0xC000003E, {"fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "socket": 41, "socketpair": 53,
                            "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311}),
    "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435, "socket": 198, "socketpair": 199, "ptrace": 117,
                             "process_vm_readv": 270, "process_vm_writev": 271}),
}

WRAPPER = r"""
import os, runpy, sys
program, status_fd, mode, guards = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
if "socket" in guards:  # no network namespace, no seccomp here: refuse sockets in Python at least
    import socket
    def _refused(*args, **kwargs):
        raise OSError("network access is disabled in the sandbox")
    socket.socket = socket.create_connection = socket.socketpair = _refused
if "fork" in guards:
    def _refused_fork(*args, **kwargs):
        raise OSError("process creation is disabled in the sandbox")
    os.fork = os.forkpty = os.system = os.posix_spawn = os.posix_spawnp = _refused_fork
    import subprocess
    subprocess.Popen = _refused_fork
sys.argv = [program]
if mode != "completes":
    os.close(status_fd)
runpy.run_path(program, run_name="__main__")
if mode == "completes":
    os.write(status_fd, b"ok\n")
"""

libc = ctypes.CDLL(None, use_errno=True)


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces(layers):
    """New user + network + PID namespaces (a root without user namespaces: network + PID only)."""
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) == 0:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
        layers += ["user namespace", "network namespace", "pid namespace"]
        return True
    if libc.unshare(CLONE_NEWNET | CLONE_NEWPID) == 0:
        layers += ["network namespace", "pid namespace"]
        return True
    return False


def set_limits(cfg, layers):
    mem, fsize, cpu = cfg["memory_bytes"], cfg["file_size_bytes"], cfg["cpu_seconds"]
    for res, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CPU, cpu),
                       (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256)):
        resource.setrlimit(res, (value, value))
    layers.append("rlimits")
    if os.getuid() != 0:  # root ignores RLIMIT_NPROC; seccomp below covers everyone
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
        layers.append("rlimit nproc")


def drop_capabilities(layers):
    if os.geteuid() != 0:
        return
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except OSError:
        last = 40
    for cap in range(last + 1):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, caps = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3, all sets empty
    if libc.capset(ctypes.byref(header), caps) == 0:
        layers.append("no capabilities")


def landlock(workdir, layers):
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(SYS_LANDLOCK[0], None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return
    fs = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_READ_DIR | FS_WRITE_DIR
    fs |= (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    net = (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0
    scoped = (SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL) if abi >= 6 else 0
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = syscall(SYS_LANDLOCK[0], ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    file_rights = FS_EXECUTE | FS_READ_FILE | FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0)

    def allow(path, access):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        if not os.path.isdir(path):
            access &= file_rights
        rule = PathBeneath(access, fd)
        syscall(SYS_LANDLOCK[1], ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)

    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    python_home = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    for path in {sys.base_prefix, sys.base_exec_prefix, python_home, *READ_PATHS}:
        allow(path, read)
    allow("/dev/null", FS_READ_FILE | FS_WRITE_FILE)
    allow(workdir, fs)
    if syscall(SYS_LANDLOCK[2], ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0:
        layers.append(f"landlock abi {abi}" + (" (files, network)" if net else " (files)")
                      + (" (scoped signals)" if scoped else ""))
    os.close(ruleset)


def seccomp(layers):
    arch = SYSCALLS.get(platform.machine())
    if arch is None:
        return
    audit_arch, nr = arch
    allow, kill = 0x7FFF0000, 0x80000000

    def deny(code):
        return 0x00050000 | code  # SECCOMP_RET_ERRNO

    prog = [(0x20, 0, 0, 4), ("jne", audit_arch, "kill"), (0x20, 0, 0, 0)]  # load arch, check, load nr
    if platform.machine() == "x86_64":
        prog.append(("jge", 0x40000000, "kill"))  # x32 syscall numbers
    for name in ("fork", "vfork", "clone3", "socket", "socketpair", "ptrace", "process_vm_readv",
                 "process_vm_writev"):
        if name in nr:
            prog.append(("ret_if", nr[name], deny(errno.ENOSYS if name == "clone3" else
                                                  errno.EAGAIN if name in ("fork", "vfork") else errno.EPERM)))
    prog += [("jne", nr["clone"], "allow"), (0x20, 0, 0, 16), ("jset", CLONE_THREAD, "allow"),
             ("ret", deny(errno.EAGAIN)), ("label", "allow"), ("ret", allow), ("label", "kill"), ("ret", kill)]
    # assemble: symbolic jumps and returns into sock_filter instructions
    flat = []
    for ins in prog:
        if ins[0] == "ret_if":  # jeq nr -> next instruction returns; else skip it
            flat += [(0x15, 0, 1, ins[1]), ("ret", ins[2])]
        else:
            flat.append(ins)
    labels, pc = {}, 0
    for ins in flat:
        if ins[0] == "label":
            labels[ins[1]] = pc
        else:
            pc += 1
    code, pc = [], 0
    for ins in flat:
        if ins[0] == "label":
            continue
        if ins[0] == "ret":
            code.append((0x06, 0, 0, ins[1]))
        elif ins[0] in ("jne", "jge", "jset"):
            off = labels[ins[2]] - pc - 1
            op = {"jne": 0x15, "jge": 0x35, "jset": 0x45}[ins[0]]
            code.append((op, 0, off, ins[1]) if ins[0] == "jne" else (op, off, 0, ins[1]))
        else:
            code.append(ins)
        pc += 1

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(code))(*[SockFilter(*c) for c in code])
    fprog = SockFprog(len(code), filters)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0:
        layers.append("seccomp")


def confine_and_exec(cfg, layers):
    status_fd = cfg["status_fd"]
    set_limits(cfg, layers)
    drop_capabilities(layers)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    landlock(cfg["workdir"], layers)
    seccomp(layers)
    guards = []
    if "seccomp" not in layers:
        guards.append("fork")
        if "network namespace" not in layers:
            guards.append("socket")
    os.write(status_fd, (json.dumps({"layers": layers}) + "\n").encode())
    python = os.path.realpath(sys.executable)
    os.execve(python, [python, "-I", "-S", "-B", "-c", WRAPPER, cfg["program"], str(status_fd), cfg["mode"],
                       ",".join(guards) or "-"], cfg["env"])


def main():
    cfg = json.loads(sys.argv[1])
    layers = []
    if cfg.get("namespaces", True) and enter_namespaces(layers):
        pid = os.fork()  # process 1 of the new PID namespace runs the program
        if pid:
            os.write(cfg["status_fd"], f"{json.dumps({'pid': pid})}\n".encode())
            os.close(cfg["status_fd"])
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)
        # killed with the launcher (the sandbox kills the launcher's process group on timeout), even after setsid()
        # dies with the launcher; the sandbox also kills it by the pid reported above
        libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    confine_and_exec(cfg, layers)


if __name__ == "__main__":
    main()
