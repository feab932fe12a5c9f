//! OCI seccomp profiles: compiled to seccomp BPF with seccompiler, installed
//! on the calling thread right before the container's execve.
//!
//! # From one profile to several filters
//!
//! A seccompiler filter has one match action and one mismatch action, while a
//! profile mixes actions. The kernel runs every installed filter on each
//! syscall and keeps the return value of highest precedence (KILL_PROCESS >
//! KILL_THREAD > TRAP > ERRNO > USER_NOTIF > TRACE > LOG > ALLOW; between
//! equal actions, the one of the filter installed last, which matters for
//! ERRNO's errno). So [`compile`] emits:
//!
//! - one filter per distinct (action, errno) of the listed syscalls other than
//!   ALLOW: that action for its syscalls (argument rules included), ALLOW for
//!   everything else;
//! - one final filter: ALLOW for every syscall listed with an action other
//!   than the default (the union of their rules), the default action for the
//!   rest. Not emitted when the default action is ALLOW.
//!
//! A call matching the rules of one group gets that group's action, since the
//! other filters all say ALLOW, the lowest precedence; a call matching none
//! gets the default action from the final filter. This holds whatever the
//! precedence of the actions relative to the default.
//!
//! Limits of the scheme:
//! - a call matching the rules of several groups (a syscall listed twice with
//!   different actions) gets the action of highest precedence, and between two
//!   ERRNO groups the errno of the filter installed later; libseccomp would
//!   reject or merge such a profile differently.
//! - entries repeating the default action only get a filter where they overlap
//!   another entry for the same syscall; elsewhere they change nothing.
//! - filters are installed one at a time and each installed one also filters
//!   the next `seccomp(2)` call: the filter that may deny `seccomp` goes last,
//!   and a profile in which two filters may deny it is refused.
//! - x86_64 only (the syscall table is x86_64's): SCMP_ARCH_* entries are
//!   ignored; i386 calls (int 0x80) kill the process (seccompiler's arch
//!   check); x32 calls get the default action, or ENOSYS from a small extra
//!   filter when the default action lets calls through.
//! - SCMP_ACT_TRACE and SCMP_ACT_NOTIFY (listenerPath) are refused: no tracer
//!   is attached to containers, and seccompiler cannot return USER_NOTIF.
//! - `flags` are ignored (no SPEC_ALLOW, LOG or TSYNC).

use std::collections::btree_map::{BTreeMap, Entry};
use std::io;
use std::path::PathBuf;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompOperator, LinuxSyscall,
};
use seccompiler::{
    sock_filter, BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp,
    SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use tracing::debug;

mod syscalls_x86_64;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp profiles are only supported on x86_64")]
    UnsupportedArch,
    #[error("seccomp action {action} is not supported: {why}")]
    UnsupportedAction {
        action: LinuxSeccompAction,
        why: &'static str,
    },
    #[error("seccomp listenerPath {0:?} is not supported: there is no seccomp agent")]
    UnsupportedListener(PathBuf),
    #[error("seccomp errno {errno} for {syscalls} is out of range (at most 65535)")]
    ErrnoRange { syscalls: String, errno: u32 },
    #[error("seccomp rule for {syscalls}: argument index {index} is out of range (0 to 5)")]
    ArgIndex { syscalls: String, index: usize },
    #[error(
        "seccomp rule for {syscalls}: SCMP_CMP_MASKED_EQ valueTwo {value:#x} has bits outside \
         the mask {mask:#x}, so it never matches"
    )]
    MaskedValue {
        syscalls: String,
        mask: u64,
        value: u64,
    },
    #[error(
        "the seccomp profile restricts seccomp(2) in {0} filters: installing one would block \
         installing the others"
    )]
    SeccompRestrictedTwice(usize),
    #[error("cannot build the seccomp filter for {what}: {source}")]
    Build {
        what: String,
        #[source]
        source: BackendError,
    },
    #[error("seccomp program {index} has {len} instructions, not 1 to 65535")]
    ProgramLength { index: usize, len: usize },
    #[error("cannot install seccomp program {index} of {count}: {source}")]
    Install {
        index: usize,
        count: usize,
        #[source]
        source: io::Error,
    },
}

/// Compiles an OCI seccomp profile into BPF programs to install in the given order.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, SeccompError> {
    if !cfg!(target_arch = "x86_64") {
        return Err(SeccompError::UnsupportedArch);
    }
    if let Some(path) = profile.listener_path() {
        return Err(SeccompError::UnsupportedListener(path.clone()));
    }
    log_ignored(profile);

    let default = action(
        profile.default_action(),
        profile.default_errno_ret(),
        "the default action",
    )?;
    // Syscalls per action other than ALLOW, in the order the profile first uses each action.
    let mut groups: Vec<(SeccompAction, Syscalls)> = Vec::new();
    // Every syscall listed with an action other than the default.
    let mut listed = Syscalls::new();
    for entry in profile.syscalls().iter().flatten() {
        let names = entry.names().join(",");
        let action = action(entry.action(), entry.errno_ret(), &names)?;
        let args = arg_match(entry, &names)?;
        let mut group = if action == SeccompAction::Allow {
            None
        } else {
            Some(group_of(&mut groups, &action))
        };
        for name in entry.names() {
            let Some(nr) = syscall_number(name) else {
                // Profiles list syscalls of other arches and newer kernels; runc skips them too.
                debug!(syscall = %name, "seccomp: no such syscall on x86_64, skipped");
                continue;
            };
            if action != default {
                add(&mut listed, nr, args.clone());
            }
            if let Some(group) = group.as_mut() {
                add(group, nr, args.clone());
            }
        }
    }

    // (filter, what it is for the error messages, whether it may deny seccomp(2))
    let mut filters: Vec<(SeccompFilter, String, bool)> = Vec::new();
    for (action, mut syscalls) in groups {
        if action == default {
            syscalls.retain(|nr, _| listed.contains_key(nr));
        }
        if syscalls.is_empty() {
            continue;
        }
        let restricts_seccomp = denies(&action) && syscalls.contains_key(&libc::SYS_seccomp);
        let what = format!("the syscalls with action {action:?}");
        let filter = build(syscalls, SeccompAction::Allow, action, &what)?;
        filters.push((filter, what, restricts_seccomp));
    }
    if default != SeccompAction::Allow {
        let restricts_seccomp =
            denies(&default) && !matches!(listed.get(&libc::SYS_seccomp), Some(ArgMatch::Any));
        let what = format!("the default action {default:?}");
        let filter = build(listed, default.clone(), SeccompAction::Allow, &what)?;
        filters.push((filter, what, restricts_seccomp));
    }
    if filters.is_empty() {
        debug!("seccomp: the profile allows everything, no filter");
        return Ok(Vec::new());
    }

    let restricting = filters.iter().filter(|(_, _, r)| *r).count();
    if restricting > 1 {
        return Err(SeccompError::SeccompRestrictedTwice(restricting));
    }
    // Stable: the one filter that may deny seccomp(2) moves last, the others keep their order.
    filters.sort_by_key(|(_, _, restricts_seccomp)| *restricts_seccomp);

    let mut programs = Vec::with_capacity(filters.len() + 1);
    if !denies(&default) {
        programs.push(x32_stub());
    }
    for (filter, what, _) in filters {
        let program = BpfProgram::try_from(filter).map_err(|source| SeccompError::Build {
            what: what.clone(),
            source,
        })?;
        programs.push(program);
    }
    debug!(programs = programs.len(), "seccomp: profile compiled");
    Ok(programs)
}

// install() hands seccompiler's instructions to the kernel as libc's.
const _: () = assert!(
    std::mem::size_of::<sock_filter>() == std::mem::size_of::<libc::sock_filter>()
        && std::mem::align_of::<sock_filter>() == std::mem::align_of::<libc::sock_filter>()
);

/// Installs them on the calling thread (caller has set no_new_privs, or has
/// CAP_SYS_ADMIN). Does not allocate, not even on error.
///
/// Not `seccompiler::apply_filter`: that one always sets no_new_privs, which
/// OCI leaves to `process.noNewPrivileges`.
pub fn install(programs: &[BpfProgram]) -> Result<(), SeccompError> {
    for (index, program) in programs.iter().enumerate() {
        let len = match u16::try_from(program.len()) {
            Ok(len) if len > 0 => len,
            _ => {
                return Err(SeccompError::ProgramLength {
                    index,
                    len: program.len(),
                })
            }
        };
        let fprog = libc::sock_fprog {
            len,
            filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
        };
        let flags: libc::c_ulong = 0;
        // SAFETY: `fprog` points at `len` live instructions whose type has
        // libc::sock_filter's layout (asserted above); the kernel only copies them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::c_ulong::from(libc::SECCOMP_SET_MODE_FILTER),
                flags,
                &fprog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(SeccompError::Install {
                index,
                count: programs.len(),
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// When a profile entry applies to one syscall's call.
#[derive(Clone, Debug)]
enum ArgMatch {
    /// Whatever the arguments.
    Any,
    /// When one of these (non-empty) rules holds.
    Rules(Vec<SeccompRule>),
}

type Syscalls = BTreeMap<i64, ArgMatch>;

/// Adds an entry's match for syscall `nr` to `syscalls`: either entry matching is a match.
fn add(syscalls: &mut Syscalls, nr: i64, args: ArgMatch) {
    match syscalls.entry(nr) {
        Entry::Vacant(slot) => {
            slot.insert(args);
        }
        Entry::Occupied(mut slot) => match (slot.get_mut(), args) {
            (ArgMatch::Any, _) => {}
            (current, ArgMatch::Any) => *current = ArgMatch::Any,
            (ArgMatch::Rules(current), ArgMatch::Rules(more)) => current.extend(more),
        },
    }
}

fn group_of<'a>(
    groups: &'a mut Vec<(SeccompAction, Syscalls)>,
    action: &SeccompAction,
) -> &'a mut Syscalls {
    let index = match groups.iter().position(|(a, _)| a == action) {
        Some(index) => index,
        None => {
            groups.push((action.clone(), Syscalls::new()));
            groups.len() - 1
        }
    };
    &mut groups[index].1
}

fn build(
    syscalls: Syscalls,
    mismatch: SeccompAction,
    on_match: SeccompAction,
    what: &str,
) -> Result<SeccompFilter, SeccompError> {
    let rules = syscalls
        .into_iter()
        .map(|(nr, args)| match args {
            // seccompiler's way of saying "whatever the arguments".
            ArgMatch::Any => (nr, Vec::new()),
            ArgMatch::Rules(rules) => (nr, rules),
        })
        .collect();
    SeccompFilter::new(rules, mismatch, on_match, TargetArch::x86_64).map_err(|source| {
        SeccompError::Build {
            what: what.to_owned(),
            source,
        }
    })
}

fn action(
    action: LinuxSeccompAction,
    errno: Option<u32>,
    syscalls: &str,
) -> Result<SeccompAction, SeccompError> {
    use LinuxSeccompAction as Oci;
    Ok(match action {
        Oci::ScmpActAllow => SeccompAction::Allow,
        Oci::ScmpActErrno => {
            let errno = errno.unwrap_or(libc::EPERM as u32);
            if errno > u32::from(u16::MAX) {
                return Err(SeccompError::ErrnoRange {
                    syscalls: syscalls.to_owned(),
                    errno,
                });
            }
            SeccompAction::Errno(errno)
        }
        // libseccomp's SCMP_ACT_KILL is SCMP_ACT_KILL_THREAD.
        Oci::ScmpActKill | Oci::ScmpActKillThread => SeccompAction::KillThread,
        Oci::ScmpActKillProcess => SeccompAction::KillProcess,
        Oci::ScmpActTrap => SeccompAction::Trap,
        Oci::ScmpActLog => SeccompAction::Log,
        Oci::ScmpActTrace => {
            return Err(SeccompError::UnsupportedAction {
                action,
                why: "no tracer is attached to containers",
            })
        }
        Oci::ScmpActNotify => {
            return Err(SeccompError::UnsupportedAction {
                action,
                why: "there is no seccomp agent, and seccompiler cannot return USER_NOTIF",
            })
        }
    })
}

/// Whether `action` stops the call (as opposed to ALLOW and LOG).
fn denies(action: &SeccompAction) -> bool {
    !matches!(action, SeccompAction::Allow | SeccompAction::Log)
}

fn arg_match(entry: &LinuxSyscall, syscalls: &str) -> Result<ArgMatch, SeccompError> {
    let args = match entry.args() {
        Some(args) if !args.is_empty() => args,
        _ => return Ok(ArgMatch::Any),
    };
    let conditions = args
        .iter()
        .map(|arg| condition(arg, syscalls))
        .collect::<Result<Vec<_>, _>>()?;
    let rule = |conditions| {
        SeccompRule::new(conditions).map_err(|source| SeccompError::Build {
            what: syscalls.to_owned(),
            source,
        })
    };
    // As runc: the conditions of an entry must all hold, unless two test the
    // same argument; then each is a rule of its own, any of which may hold.
    let same_arg_twice = args
        .iter()
        .enumerate()
        .any(|(i, arg)| args[..i].iter().any(|a| a.index() == arg.index()));
    let rules = if same_arg_twice {
        conditions
            .into_iter()
            .map(|c| rule(vec![c]))
            .collect::<Result<_, _>>()?
    } else {
        vec![rule(conditions)?]
    };
    Ok(ArgMatch::Rules(rules))
}

fn condition(arg: &LinuxSeccompArg, syscalls: &str) -> Result<SeccompCondition, SeccompError> {
    use LinuxSeccompOperator as Oci;
    let index = match u8::try_from(arg.index()) {
        Ok(index) if index <= 5 => index,
        _ => {
            return Err(SeccompError::ArgIndex {
                syscalls: syscalls.to_owned(),
                index: arg.index(),
            })
        }
    };
    let (op, value) = match arg.op() {
        Oci::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        Oci::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        Oci::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        Oci::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        Oci::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        Oci::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        // (arg & value) == valueTwo. seccompiler masks valueTwo too, libseccomp
        // does not: refuse the one case where that differs.
        Oci::ScmpCmpMaskedEq => {
            let (mask, value) = (arg.value(), arg.value_two().unwrap_or(0));
            if value & !mask != 0 {
                return Err(SeccompError::MaskedValue {
                    syscalls: syscalls.to_owned(),
                    mask,
                    value,
                });
            }
            (SeccompCmpOp::MaskedEq(mask), value)
        }
    };
    // Whole 64-bit arguments, as libseccomp compares them on x86_64.
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).map_err(|source| {
        SeccompError::Build {
            what: syscalls.to_owned(),
            source,
        }
    })
}

fn syscall_number(name: &str) -> Option<i64> {
    let table = syscalls_x86_64::SYSCALLS;
    table
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| table[i].1)
}

fn log_ignored(profile: &LinuxSeccomp) {
    for arch in profile.architectures().iter().flatten() {
        if !matches!(arch, Arch::ScmpArchX86_64 | Arch::ScmpArchNative) {
            debug!(
                ?arch,
                "seccomp: only x86_64 is filtered, architecture ignored"
            );
        }
    }
    if let Some(flags) = profile.flags().as_ref().filter(|f| !f.is_empty()) {
        debug!(?flags, "seccomp: flags ignored");
    }
}

/// Bit set in the number of x32-ABI syscalls, which share x86_64's
/// AUDIT_ARCH and so pass seccompiler's arch check.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// ENOSYS for x32 syscalls, ALLOW for the rest: no other filter names their
/// numbers, so without it a denylist profile would not apply to them.
fn x32_stub() -> BpfProgram {
    let insn = |code: u32, jt: u8, jf: u8, k: u32| sock_filter {
        // BPF opcodes fit 16 bits; libc declares them u32.
        code: code as u16,
        jt,
        jf,
        k,
    };
    vec![
        // A = seccomp_data.nr (offset 0)
        insn(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
        insn(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            0,
            1,
            X32_SYSCALL_BIT,
        ),
        insn(
            libc::BPF_RET | libc::BPF_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
        insn(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;
    use nix::sys::signal::Signal;
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    use serde_json::json;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).expect("a valid OCI seccomp profile")
    }

    /// The syscalls a forked test child needs to report back.
    const EXIT: [&str; 2] = ["exit_group", "exit"];

    #[test]
    fn table_is_sorted_and_knows_x86_64_numbers() {
        let table = syscalls_x86_64::SYSCALLS;
        assert!(table.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(syscall_number("read"), Some(0));
        assert_eq!(syscall_number("seccomp"), Some(libc::SYS_seccomp));
        assert_eq!(syscall_number("personality"), Some(libc::SYS_personality));
        assert_eq!(syscall_number("riscv_flush_icache"), None);
    }

    #[test]
    fn errno_default_with_allow_list_is_one_program() {
        let programs = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{ "names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW" }]
        })))
        .unwrap();
        assert_eq!(programs.len(), 1);
    }

    #[test]
    fn mixed_actions_give_one_program_per_group() {
        // Two non-ALLOW groups and the final filter.
        let programs = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                { "names": ["read", "write"], "action": "SCMP_ACT_ALLOW" },
                { "names": ["uname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38 },
                { "names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38 },
                { "names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS" },
                // Same as the default and listed nowhere else: no filter.
                { "names": ["mount"], "action": "SCMP_ACT_ERRNO" }
            ]
        })))
        .unwrap();
        assert_eq!(programs.len(), 3);

        // A denylist: the x32 stub and the ERRNO group, no final filter.
        let programs = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{ "names": ["mount"], "action": "SCMP_ACT_ERRNO" }]
        })))
        .unwrap();
        assert_eq!(programs.len(), 2);
        assert_eq!(programs[0], x32_stub());

        let programs = compile(&profile(json!({ "defaultAction": "SCMP_ACT_ALLOW" }))).unwrap();
        assert!(programs.is_empty());
    }

    #[test]
    fn unknown_syscall_names_are_skipped() {
        let with_unknown = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{ "names": ["read", "no_such_syscall", "arm_fadvise64_64"], "action": "SCMP_ACT_ALLOW" }]
        })))
        .unwrap();
        let without = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{ "names": ["read"], "action": "SCMP_ACT_ALLOW" }]
        })))
        .unwrap();
        assert_eq!(with_unknown, without);
    }

    #[test]
    fn notify_trace_and_listener_are_refused() {
        for action in ["SCMP_ACT_NOTIFY", "SCMP_ACT_TRACE"] {
            let err = compile(&profile(json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{ "names": ["mount"], "action": action }]
            })))
            .unwrap_err();
            assert!(
                matches!(err, SeccompError::UnsupportedAction { .. }),
                "{err}"
            );
            assert!(err.to_string().contains(action), "{err}");
        }
        let err = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "listenerPath": "/run/seccomp-agent.sock"
        })))
        .unwrap_err();
        assert!(matches!(err, SeccompError::UnsupportedListener(_)), "{err}");
    }

    #[test]
    fn bad_arguments_are_refused() {
        let err = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{ "names": ["personality"], "action": "SCMP_ACT_ALLOW",
                           "args": [{ "index": 6, "value": 0, "op": "SCMP_CMP_EQ" }] }]
        })))
        .unwrap_err();
        assert!(
            matches!(err, SeccompError::ArgIndex { index: 6, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("personality"), "{err}");

        let err = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{ "names": ["clone"], "action": "SCMP_ACT_ALLOW",
                           "args": [{ "index": 0, "value": 0xff, "valueTwo": 0x100, "op": "SCMP_CMP_MASKED_EQ" }] }]
        })))
        .unwrap_err();
        assert!(matches!(err, SeccompError::MaskedValue { .. }), "{err}");
    }

    #[test]
    fn seccomp_restricted_by_two_filters_is_refused() {
        let err = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                { "names": ["seccomp"], "action": "SCMP_ACT_ERRNO",
                  "args": [{ "index": 0, "value": 1, "op": "SCMP_CMP_EQ" }] },
                { "names": ["seccomp"], "action": "SCMP_ACT_KILL_PROCESS",
                  "args": [{ "index": 0, "value": 2, "op": "SCMP_CMP_EQ" }] }
            ]
        })))
        .unwrap_err();
        assert!(
            matches!(err, SeccompError::SeccompRestrictedTwice(2)),
            "{err}"
        );
    }

    /// Forks a child that sets no_new_privs, installs `programs`, and exits
    /// with `probe()`'s code (101/102: setting up failed). After the fork the
    /// child only makes raw syscalls: the harness's other threads may hold locks.
    fn run_filtered(programs: &[BpfProgram], probe: fn() -> i32) -> WaitStatus {
        // SAFETY: see above; the child ends in _exit.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let no_core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: plain syscalls on values that outlive them.
                let code = unsafe {
                    // No core files from the SIGSYS tests.
                    libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                        101
                    } else if install(programs).is_err() {
                        102
                    } else {
                        probe()
                    }
                };
                // SAFETY: ends the child without running the harness's atexit handlers.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
        }
    }

    /// The errno of a failed raw call, 0 if it succeeded.
    fn errno_of(rc: libc::c_long) -> i32 {
        if rc == -1 {
            Errno::last_raw()
        } else {
            0
        }
    }

    fn uname() -> i32 {
        // SAFETY: utsname is plain data, filled in by the kernel.
        let mut buf: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: `buf` is a valid utsname.
        errno_of(unsafe { libc::uname(&mut buf) }.into())
    }

    fn mkdir() -> i32 {
        // SAFETY: a valid C string; the parent does not exist, so nothing is created.
        errno_of(unsafe { libc::mkdir(c"/nonexistent-husk-test/dir".as_ptr(), 0o700) }.into())
    }

    fn getppid_ok() -> bool {
        // SAFETY: no arguments.
        let ppid = unsafe { libc::getppid() };
        ppid > 0
    }

    fn assert_exited_0(status: WaitStatus) {
        assert!(
            matches!(status, WaitStatus::Exited(_, 0)),
            "child: {status:?}"
        );
    }

    #[test]
    fn errno_default_denies_what_is_not_allowed() {
        let programs = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{ "names": [EXIT[0], EXIT[1], "getppid"], "action": "SCMP_ACT_ALLOW" }]
        })))
        .unwrap();
        assert_exited_0(run_filtered(&programs, || {
            match (getppid_ok(), uname(), mkdir()) {
                (true, libc::EPERM, libc::EPERM) => 0,
                (false, _, _) => 1,
                (_, libc::EPERM, _) => 3,
                _ => 2,
            }
        }));
    }

    #[test]
    fn custom_errno_log_and_default_errno_together() {
        // Four filters, installed one by one: the seccomp(2) group, listed
        // first, must go in last or it would block the others.
        let programs = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": libc::EACCES,
            "syscalls": [
                { "names": ["seccomp"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EXDEV },
                { "names": [EXIT[0], EXIT[1]], "action": "SCMP_ACT_ALLOW" },
                { "names": ["uname"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS },
                { "names": ["getppid"], "action": "SCMP_ACT_LOG" }
            ]
        })))
        .unwrap();
        assert_eq!(programs.len(), 4);
        assert_exited_0(run_filtered(&programs, || {
            // SAFETY: an invalid operation with no pointer; the filter answers first.
            let seccomp = errno_of(unsafe { libc::syscall(libc::SYS_seccomp, 99, 0, 0) });
            match (getppid_ok(), uname(), mkdir(), seccomp) {
                (true, libc::ENOSYS, libc::EACCES, libc::EXDEV) => 0,
                (false, ..) => 1,
                (_, libc::ENOSYS, libc::EACCES, _) => 4,
                (_, libc::ENOSYS, ..) => 3,
                _ => 2,
            }
        }));
    }

    #[test]
    fn argument_conditions_select_calls() {
        // personality(0xffffffff) only queries; the value docker's profile allows.
        let programs = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                { "names": EXIT, "action": "SCMP_ACT_ALLOW" },
                { "names": ["personality"], "action": "SCMP_ACT_ALLOW",
                  "args": [{ "index": 0, "value": 0xffff_ffff_u64, "op": "SCMP_CMP_EQ" }] }
            ]
        })))
        .unwrap();
        assert_exited_0(run_filtered(&programs, || {
            // SAFETY: personality takes a plain value.
            let query = errno_of(unsafe { libc::personality(0xffff_ffff) }.into());
            // SAFETY: as above; 0 (PER_LINUX) is the persona the child already has.
            let set = errno_of(unsafe { libc::personality(0) }.into());
            match (query, set) {
                (0, libc::EPERM) => 0,
                (0, _) => 2,
                _ => 1,
            }
        }));

        // socket(AF_INET, ...) denied; AF_UNIX, and SOCK_STREAM whatever its flags, allowed.
        let programs = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                { "names": ["socket"], "action": "SCMP_ACT_ERRNO",
                  "args": [{ "index": 0, "value": libc::AF_INET, "op": "SCMP_CMP_EQ" }] },
                { "names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EACCES,
                  "args": [{ "index": 0, "value": libc::AF_UNIX, "op": "SCMP_CMP_EQ" },
                           { "index": 1, "value": 0xf, "valueTwo": libc::SOCK_DGRAM, "op": "SCMP_CMP_MASKED_EQ" }] }
            ]
        })))
        .unwrap();
        assert_exited_0(run_filtered(&programs, || {
            let socket = |domain, ty| {
                // SAFETY: socket takes plain values; a created fd is left to _exit.
                errno_of(unsafe { libc::socket(domain, ty, 0) }.into())
            };
            match (
                socket(libc::AF_INET, libc::SOCK_STREAM),
                socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC),
                socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC),
            ) {
                (libc::EPERM, 0, libc::EACCES) => 0,
                (libc::EPERM, 0, _) => 3,
                (libc::EPERM, _, _) => 2,
                _ => 1,
            }
        }));
    }

    #[test]
    fn kill_process_and_trap_end_the_child_with_sigsys() {
        for action in ["SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL", "SCMP_ACT_TRAP"] {
            let programs = compile(&profile(json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{ "names": ["uname"], "action": action }]
            })))
            .unwrap();
            let status = run_filtered(&programs, || if getppid_ok() { uname() + 10 } else { 1 });
            assert!(
                matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
                "{action}: child {status:?}"
            );
        }
    }
}
