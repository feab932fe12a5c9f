//! husk-vmm on real KVM with tiny hand-assembled guests: the 64-bit boot path,
//! the serial console, reset, guest death, INT3 handling, the control API and
//! the errors for bad inputs. Each guest is a few bytes of 64-bit code in an
//! ELF whose one PT_LOAD sits at 1 MiB, entered the way a vmlinux is.
//!
//! These tests need /dev/kvm; without it they fail (they never pass silently).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const LOAD_ADDR: u64 = 0x10_0000;

/// Prints the NUL-terminated message that follows it to COM1, then resets
/// the machine through the i8042 port:
/// ```text
///   mov $0x3f8,%dx ; lea msg(%rip),%rsi
/// 1: lodsb ; test %al,%al ; jz 2f ; out %al,%dx ; jmp 1b
/// 2: mov $0xfe,%al ; out %al,$0x64 ; hlt
/// msg:
/// ```
const PRINT_AND_RESET: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0x48, 0x8d, 0x35, 0x0d, 0x00, 0x00, 0x00, 0xac, 0x84, 0xc0, 0x74, 0x03,
    0xee, 0xeb, 0xf8, 0xb0, 0xfe, 0xe6, 0x64, 0xf4,
];

/// `ud2` with no IDT: #UD, then #DF, then a triple fault.
const UD2: &[u8] = &[0x0f, 0x0b];

/// `jmp .`: runs until stopped.
const SPIN: &[u8] = &[0xeb, 0xfe];

/// Installs an IDT whose #BP handler prints 'B' and returns, runs `int3`,
/// prints 'K', then resets. On PVM hosts KVM's emulator refuses INT3 in guest
/// kernel mode and husk-vmm injects the #BP itself; on other hosts it runs as is.
/// ```text
///   lea bp_handler(%rip),%rax ; mov $0x2030,%rdi
///   mov %ax,(%rdi) ; movw $8,2(%rdi) ; movw $0x8e00,4(%rdi)
///   shr $16,%rax ; mov %ax,6(%rdi) ; movl $0,8(%rdi) ; movl $0,12(%rdi)
///   movw $0xfff,0x3000 ; movq $0x2000,0x3002 ; lidt 0x3000
///   int3
///   mov $0x3f8,%dx ; mov $'K',%al ; out %al,%dx ; mov $'\n',%al ; out %al,%dx
///   mov $0xfe,%al ; out %al,$0x64 ; hlt
/// bp_handler:
///   push %rax ; push %rdx ; mov $0x3f8,%dx ; mov $'B',%al ; out %al,%dx
///   pop %rdx ; pop %rax ; iretq
/// ```
const INT3_WITH_HANDLER: &[u8] = &[
    0x48, 0x8d, 0x05, 0x5a, 0x00, 0x00, 0x00, 0x48, 0xc7, 0xc7, 0x30, 0x20, 0x00, 0x00, 0x66, 0x89,
    0x07, 0x66, 0xc7, 0x47, 0x02, 0x08, 0x00, 0x66, 0xc7, 0x47, 0x04, 0x00, 0x8e, 0x48, 0xc1, 0xe8,
    0x10, 0x66, 0x89, 0x47, 0x06, 0xc7, 0x47, 0x08, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x47, 0x0c, 0x00,
    0x00, 0x00, 0x00, 0x66, 0xc7, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, 0xff, 0x0f, 0x48, 0xc7, 0x04,
    0x25, 0x02, 0x30, 0x00, 0x00, 0x00, 0x20, 0x00, 0x00, 0x0f, 0x01, 0x1c, 0x25, 0x00, 0x30, 0x00,
    0x00, 0xcc, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x4b, 0xee, 0xb0, 0x0a, 0xee, 0xb0, 0xfe, 0xe6, 0x64,
    0xf4, 0x50, 0x52, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x42, 0xee, 0x5a, 0x58, 0x48, 0xcf,
];

/// A minimal ELF64 executable with one PT_LOAD of `code` at `LOAD_ADDR`.
fn elf_image(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let offset = (EHDR + PHDR) as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    elf.extend_from_slice(&(EHDR as u64).to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    elf.extend_from_slice(&(EHDR as u16).to_le_bytes());
    elf.extend_from_slice(&(PHDR as u16).to_le_bytes());
    elf.extend_from_slice(&1u16.to_le_bytes()); // phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // shstrndx
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&7u32.to_le_bytes()); // RWX
    elf.extend_from_slice(&offset.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // vaddr
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // paddr
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes()); // filesz
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes()); // memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // align
    elf.extend_from_slice(code);
    elf
}

fn print_guest(message: &str) -> Vec<u8> {
    let mut code = PRINT_AND_RESET.to_vec();
    code.extend_from_slice(message.as_bytes());
    code.push(0);
    code
}

struct Guest {
    dir: tempfile::TempDir,
    kernel: PathBuf,
}

impl Guest {
    fn new(code: &[u8]) -> Self {
        assert!(
            Path::new("/dev/kvm").exists(),
            "/dev/kvm is missing: these tests boot real KVM guests and cannot run"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let kernel = dir.path().join("guest.elf");
        std::fs::write(&kernel, elf_image(code)).expect("write guest");
        Self { dir, kernel }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_husk-vmm"));
        cmd.arg("run").arg("--kernel").arg(&self.kernel);
        cmd
    }

    /// Runs to completion with a deadline; a hang is a test failure.
    fn run(&self, args: &[&str]) -> Output {
        let child = self
            .command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn husk-vmm");
        wait_with_deadline(child, Duration::from_secs(60))
    }
}

fn wait_with_deadline(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("husk-vmm did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn guest_prints_on_the_serial_console_and_resets_cleanly() {
    let guest = Guest::new(&print_guest("husk tiny guest\n"));
    let out = guest.run(&[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "husk tiny guest\n");
}

#[test]
fn console_log_goes_to_the_named_file() {
    let guest = Guest::new(&print_guest("to the log\n"));
    let log = guest.path("console.log");
    let out = guest.run(&["--console-log", log.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "to the log\n");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_triple_fault_is_reported_as_guest_death() {
    let out = Guest::new(UD2).run(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("triple-faulted"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_kernel_panic_then_reset_is_guest_death_not_shutdown() {
    let out = Guest::new(&print_guest("Kernel panic - not syncing: test\n")).run(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn int3_reaches_the_guest_breakpoint_handler() {
    let out = Guest::new(INT3_WITH_HANDLER).run(&[]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "BK\n");
}

#[test]
fn a_kernel_that_is_not_elf_is_refused() {
    let guest = Guest::new(SPIN);
    std::fs::write(&guest.kernel, b"MZ this is not an ELF file at all.......").unwrap();
    let out = guest.run(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not a loadable 64-bit ELF"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn missing_files_are_named() {
    let guest = Guest::new(SPIN);
    let missing = guest.path("nope");
    for flag in ["--initrd", "--disk"] {
        let out = guest.run(&[flag, missing.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        let err = text(&out.stderr);
        assert!(
            err.contains("nope") && err.contains("No such file"),
            "{flag}: {err}"
        );
    }
    let mut cmd = guest.command();
    cmd.args(["--kernel", missing.to_str().unwrap()]);
    // --kernel given twice is a usage error; run a fresh command instead.
    let out = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .args(["run", "--kernel", missing.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot open guest kernel"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn too_little_memory_is_refused() {
    let out = Guest::new(SPIN).run(&["--mem-mib", "4"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("too small"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_initrd_larger_than_memory_is_refused() {
    let guest = Guest::new(SPIN);
    let initrd = guest.path("big.cpio");
    let file = std::fs::File::create(&initrd).unwrap();
    file.set_len(64 << 20).unwrap();
    let out = guest.run(&["--mem-mib", "32", "--initrd", initrd.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("does not fit"),
        "{}",
        text(&out.stderr)
    );
}

/// A control-API client: one JSON request per line, one reply per line.
struct Api {
    reader: BufReader<UnixStream>,
}

impl Api {
    fn connect(path: &Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("set the API socket's read timeout");
                    return Self {
                        reader: BufReader::new(s),
                    };
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("API socket never came up: {e}"),
            }
        }
    }

    fn call(&mut self, request: &str) -> serde_json::Value {
        let stream = self.reader.get_mut();
        stream
            .write_all(request.as_bytes())
            .and_then(|()| stream.write_all(b"\n"))
            .expect("send an API request");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read an API reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
    }
}

#[test]
fn control_api_reports_swaps_disks_and_shuts_down() {
    let guest = Guest::new(SPIN);
    let sock = guest.path("api.sock");
    let disk = guest.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let vsock = guest.path("vsock.sock");
    let child = guest
        .command()
        .args(["--api-sock", sock.to_str().unwrap(), "--spare-disks", "1"])
        .args(["--vsock-uds", vsock.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut api = Api::connect(&sock);

    let status = api.call(r#"{"op":"status"}"#);
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["status"]["state"], "running");
    assert_eq!(status["status"]["disks"][0]["sectors"], 0);
    assert_eq!(status["status"]["disks"][0]["read_only"], true);

    let attach = format!(
        r#"{{"op":"attach_disk","index":0,"path":"{}"}}"#,
        disk.display()
    );
    assert_eq!(api.call(&attach)["ok"], true);
    let status = api.call(r#"{"op":"status"}"#);
    assert_eq!(status["status"]["disks"][0]["sectors"], 2048, "{status}");
    assert_eq!(status["status"]["disks"][0]["path"], disk.to_str().unwrap());

    let bad_slot = api.call(r#"{"op":"attach_disk","index":7,"path":"/x"}"#);
    assert_eq!(bad_slot["ok"], false);
    assert!(bad_slot["error"]
        .as_str()
        .unwrap()
        .contains("no disk slot 7"));
    let missing = api.call(r#"{"op":"attach_disk","index":0,"path":"/no/such/image"}"#);
    assert_eq!(missing["ok"], false);
    assert_eq!(api.call("this is not json")["ok"], false);

    assert_eq!(api.call(r#"{"op":"detach_disk","index":0}"#)["ok"], true);
    assert_eq!(
        api.call(r#"{"op":"status"}"#)["status"]["disks"][0]["sectors"],
        0
    );

    assert_eq!(api.call(r#"{"op":"shutdown"}"#)["ok"], true);
    let out = wait_with_deadline(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(!sock.exists(), "the API socket is removed on exit");
    assert!(!vsock.exists(), "the vsock socket is removed on exit");
}

#[test]
fn sigterm_stops_the_vm_and_removes_its_sockets() {
    let guest = Guest::new(SPIN);
    let api = guest.path("api.sock");
    let vsock = guest.path("vsock.sock");
    let child = guest
        .command()
        .args(["--api-sock", api.to_str().unwrap()])
        .args(["--vsock-uds", vsock.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the API answers, the VM runs and the signal handler is in place.
    Api::connect(&api).call(r#"{"op":"status"}"#);
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill(1)");
    assert!(kill.success());
    let out = wait_with_deadline(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("SIGTERM"),
        "{}",
        text(&out.stderr)
    );
    assert!(!api.exists() && !vsock.exists(), "sockets left behind");
}
