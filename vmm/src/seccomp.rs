//! The VMM's seccomp filters, one per thread kind: the vCPU threads (KVM_RUN
//! and the device register accesses that exit to them) and the main thread
//! (the event loop: devices' host I/O, the control API, signals). They are
//! data, `vmm/seccomp/x86_64.json` in seccompiler's JSON format, compiled
//! when the VMM starts and installed by each thread before the guest runs its
//! first instruction; any other system call kills the process by SIGSYS,
//! after [`report_sigsys`]'s handler has said which call it was. Installing
//! a filter also sets no_new_privs.

use seccompiler::{BpfProgram, TargetArch};

/// The filters, reviewed like code: each rule names why it is there.
const FILTERS_JSON: &str = include_str!("../seccomp/x86_64.json");

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("the seccomp filters do not compile: {0}")]
    Compile(seccompiler::Error),
    #[error("the seccomp filters have no {0:?} filter")]
    Missing(&'static str),
    #[error("cannot install the {thread} seccomp filter: {source}")]
    Install {
        thread: &'static str,
        source: seccompiler::Error,
    },
}

/// The compiled filters.
pub struct Filters {
    vcpu: BpfProgram,
    vmm: BpfProgram,
}

impl Filters {
    pub fn compile() -> Result<Filters, SeccompError> {
        let mut map = seccompiler::compile_from_json(FILTERS_JSON.as_bytes(), TargetArch::x86_64)
            .map_err(SeccompError::Compile)?;
        let mut take = |name: &'static str| map.remove(name).ok_or(SeccompError::Missing(name));
        Ok(Filters {
            vcpu: take("vcpu")?,
            vmm: take("vmm")?,
        })
    }

    /// Installs the vCPU filter on the calling thread.
    pub fn install_vcpu(&self) -> Result<(), SeccompError> {
        install("vcpu", &self.vcpu)
    }

    /// Installs the main thread's filter on the calling thread.
    pub fn install_vmm(&self) -> Result<(), SeccompError> {
        install("vmm", &self.vmm)
    }
}

fn install(thread: &'static str, filter: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(filter).map_err(|source| SeccompError::Install { thread, source })
}

/// SIGSYS's si_code when a seccomp filter trapped the call.
const SYS_SECCOMP: i32 = 1;
/// Where siginfo's `_sigsys._syscall` and `si_pid` are on x86_64 (libc's
/// siginfo_t has no accessor for the first).
const SIGINFO_SYSCALL_OFFSET: usize = 24;

/// Makes a SIGSYS say why before the process dies of it: the filters trap
/// a refused call (rather than kill outright) so that this handler can
/// write `husk-vmm: seccomp refused system call N` to stderr, the VMM's
/// log, where huskd reads a dead VMM's last word. Then the process dies by
/// SIGSYS all the same. Install before the filters.
pub fn report_sigsys() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value;
    // the handler only makes async-signal-safe system calls.
    let result = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let mut line = Line::default();
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler;
    // for SIGSYS the syscall number is at its fixed offset.
    let (code, syscall, sender) = unsafe {
        let syscall = info
            .cast::<u8>()
            .add(SIGINFO_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned();
        ((*info).si_code, syscall, (*info).si_pid())
    };
    if code == SYS_SECCOMP {
        line.push(b"husk-vmm: seccomp refused system call ");
        line.push_number(i64::from(syscall));
        line.push(b" (the filters are vmm/seccomp/x86_64.json); killed by SIGSYS\n");
    } else {
        line.push(b"husk-vmm: killed by SIGSYS sent by pid ");
        line.push_number(i64::from(sender));
        line.push(b"\n");
    }
    // SAFETY: write, getppid, signal and raise are async-signal-safe; the
    // buffer outlives the write.
    unsafe {
        libc::write(2, line.bytes.as_ptr().cast(), line.len);
        // Refused by every filter (a test says so): with SIGSYS blocked in
        // this handler, the kernel kills the process by SIGSYS at once.
        libc::syscall(libc::SYS_getppid);
        // No filter (yet): die of the signal once this handler returns.
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::raise(libc::SIGSYS);
    }
}

/// A line built without allocating (in a signal handler).
struct Line {
    bytes: [u8; 160],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            bytes: [0; 160],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, text: &[u8]) {
        let n = text.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&text[..n]);
        self.len += n;
    }

    fn push_number(&mut self, value: i64) {
        let mut digits = [0u8; 20];
        let mut n = value.unsigned_abs();
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if value < 0 {
            self.push(b"-");
        }
        self.push(&digits[at..]);
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::signal::Signal;
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};

    use super::*;

    /// Runs `work` in a child process under `filter`; how the child ended.
    /// The filter is compiled here, before the fork: the child of a
    /// threaded test process may only make system calls.
    fn under_filter(filter: &BpfProgram, work: fn()) -> WaitStatus {
        // SAFETY: the child only installs the filter (prctl, seccomp), runs
        // `work` (raw system calls) and _exits; it touches no lock another
        // thread of the test process could hold.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let code = match seccompiler::apply_filter(filter) {
                    Ok(()) => {
                        work();
                        0
                    }
                    Err(_) => 99,
                };
                // SAFETY: ends the child at once, as a forked child must.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
        }
    }

    #[test]
    fn both_filters_compile() {
        Filters::compile().expect("the filters compile");
    }

    #[test]
    fn allowed_calls_pass_and_others_kill_the_process() {
        let filters = Filters::compile().expect("compile");
        for filter in [&filters.vmm, &filters.vcpu] {
            let writes = under_filter(filter, || {
                // SAFETY: a write of a static buffer to stderr.
                unsafe { libc::write(2, c"".as_ptr().cast(), 0) };
            });
            assert!(matches!(writes, WaitStatus::Exited(_, 0)), "{writes:?}");
            let forbidden = under_filter(filter, || {
                // SAFETY: getppid takes nothing and changes nothing.
                unsafe { libc::syscall(libc::SYS_getppid) };
            });
            assert!(
                matches!(forbidden, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
                "a forbidden call: {forbidden:?}"
            );
        }
    }

    #[test]
    fn a_refused_call_is_named_on_stderr_before_the_sigsys_death() {
        let filters = Filters::compile().expect("compile");
        let (read, write) = nix::unistd::pipe().expect("pipe");
        // SAFETY: the child only redirects stderr, installs the handler and
        // the filter, and makes system calls; it ends by SIGSYS or _exit.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                // SAFETY: plain system calls on fds this child owns.
                unsafe {
                    libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&write), 2);
                }
                if report_sigsys().is_ok() && seccompiler::apply_filter(&filters.vcpu).is_ok() {
                    // SAFETY: getpid takes nothing; refused by the filter.
                    unsafe { libc::syscall(libc::SYS_getpid) };
                }
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(99) }
            }
            ForkResult::Parent { child } => {
                drop(write);
                let status = waitpid(child, None).expect("waitpid");
                assert!(
                    matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
                    "{status:?}"
                );
                let mut said = String::new();
                std::io::Read::read_to_string(&mut std::fs::File::from(read), &mut said)
                    .expect("read");
                assert_eq!(
                    said,
                    format!(
                        "husk-vmm: seccomp refused system call {} (the filters are \
                         vmm/seccomp/x86_64.json); killed by SIGSYS\n",
                        libc::SYS_getpid
                    )
                );
            }
        }
    }

    #[test]
    fn vcpu_threads_may_not_open_files_or_sockets() {
        let filters = Filters::compile().expect("compile");
        for work in [
            (|| {
                // SAFETY: openat of a static path; the fd, if any, is leaked
                // by a child that exits at once.
                unsafe { libc::openat(libc::AT_FDCWD, c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
            }) as fn(),
            || {
                // SAFETY: socket takes plain integers.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            },
        ] {
            let status = under_filter(&filters.vcpu, work);
            assert!(
                matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
                "{status:?}"
            );
        }
        // The main thread may make unix sockets (vsock), not others.
        let inet = under_filter(&filters.vmm, || {
            // SAFETY: socket takes plain integers.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        });
        assert!(
            matches!(inet, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
            "{inet:?}"
        );
    }
}
