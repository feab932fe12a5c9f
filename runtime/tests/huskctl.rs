//! huskctl end to end: the built huskctl binary against a real huskd on the
//! `host` sandbox driver, with husk-agent and a real registry on loopback.
//!
//! Needs root (namespaces, mounts, cgroups), scripts/install-deps.sh's
//! packages, and husk-agent and huskctl built first: `cargo build -p
//! husk-agent -p huskctl` (or HUSK_AGENT=/path/to/husk-agent,
//! HUSKCTL=/path/to/huskctl). It lives here, not in huskctl/, because it
//! needs huskd's binary and this package's test support.

mod support;

use std::io::Write;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{busybox_registry, husk_agent, Huskd};

const PATIENCE: Duration = Duration::from_secs(30);

struct Ctl {
    socket: String,
}

impl Ctl {
    fn output(&self, args: &[&str]) -> Output {
        let out = Command::new(support::huskctl())
            .env("HUSK_SOCKET", &self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run huskctl");
        eprintln!(
            "huskctl {}: {}\n--- stdout\n{}--- stderr\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// One huskctl run with `input` on its stdin.
    fn output_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = Command::new(support::huskctl())
            .env("HUSK_SOCKET", &self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run huskctl");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input).expect("write stdin");
        drop(stdin);
        child.wait_with_output().expect("huskctl output")
    }

    /// Runs huskctl, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(out.status.success(), "huskctl {args:?}: {}", out.status);
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).expect("huskctl printed JSON")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The row of a table whose cells include `cell`.
fn row<'a>(table: &'a str, cell: &str) -> Option<Vec<&'a str>> {
    table
        .lines()
        .map(|l| {
            l.split("   ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
        })
        .find(|cells| cells.contains(&cell))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huskctl_drives_huskd() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "huskd's host driver creates namespaces, mounts and cgroups: run this as root"
    );
    husk_agent();
    let (registry, image) = busybox_registry("1000").await;

    let dir = tempfile::tempdir().expect("tempdir");
    let _agents = support::AgentSweeper::new(dir.path());
    let socket = dir.path().join("husk.sock");
    let _huskd = Huskd::spawn(&socket, &Huskd::host_args(dir.path()));
    let ctl = Ctl {
        socket: format!("unix://{}", socket.display()),
    };

    let version = ctl.ok(&["version"]);
    assert!(version.contains("RuntimeName:  husk\n"), "{version}");
    let info = ctl.json(&["info"]);
    assert!(info["status"]["conditions"].is_array(), "{info}");

    // Images.
    let pulled = ctl.ok(&["pull", &image]);
    assert!(
        pulled.starts_with("Image is up to date for sha256:"),
        "{pulled}"
    );
    let images = ctl.ok(&["images"]);
    let header = images.lines().next().expect("header");
    assert!(
        header.starts_with("IMAGE") && header.contains("IMAGE ID"),
        "{images}"
    );
    let busybox = row(&images, &format!("{}/husk/busybox", registry.host())).expect("image row");
    assert_eq!(busybox[1], "latest", "{images}");
    assert_eq!(busybox[2].len(), 13, "{images}");
    assert!(busybox[3].ends_with("MB"), "{images}");
    let listed = ctl.json(&["images", "-o", "json"]);
    assert_eq!(
        listed["images"][0]["repo_tags"][0],
        image.as_str(),
        "{listed}"
    );
    let id = listed["images"][0]["id"].as_str().expect("id").to_owned();
    assert_eq!(ctl.ok(&["images", "-q"]), format!("{id}\n"));

    // One shot: output on the right streams, the exit code, nothing left behind.
    let run = ctl.output(&[
        "run",
        &image,
        "--runtime",
        "host",
        "--",
        "sh",
        "-c",
        "echo hi; echo oops >&2; exit 3",
    ]);
    assert_eq!(run.status.code(), Some(3), "{run:?}");
    assert_eq!(text(&run.stdout), "hi\n");
    assert_eq!(text(&run.stderr), "oops\n");
    assert_eq!(ctl.ok(&["pods", "-q"]), "");
    assert_eq!(ctl.ok(&["ps", "-a", "-q"]), "");

    // Ctrl-C during run: exit 130, and the pod goes all the same.
    let mut child = Command::new(support::huskctl())
        .env("HUSK_SOCKET", &ctl.socket)
        .args(["run", &image, "--runtime", "host", "--"])
        .args(["sh", "-c", "echo ready; sleep 1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run huskctl");
    let mut ready = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("read");
    assert_eq!(ready, "ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT huskctl");
    assert_eq!(child.wait().expect("wait").code(), Some(130));
    assert_eq!(ctl.ok(&["pods", "-q"]), "");

    // A pod from a JSON file in crictl's shape.
    let logs = dir.path().join("logs");
    let pod_json = dir.path().join("pod.json");
    std::fs::write(
        &pod_json,
        serde_json::json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "uid-web", "attempt": 0},
            "hostname": "web",
            "log_directory": logs.display().to_string(),
            "labels": {"tier": "test"},
            "linux": {"security_context": {"namespace_options": {"network": 2}}}
        })
        .to_string(),
    )
    .expect("pod.json");
    let pod = ctl.ok(&[
        "runp",
        "--runtime",
        "host",
        pod_json.to_str().expect("utf-8"),
    ]);
    let pod = pod.trim().to_owned();
    assert!(pod.len() > 13, "{pod}");
    let pods = ctl.ok(&["pods"]);
    let web = row(&pods, "web").expect("pod row");
    assert_eq!(web[0], &pod[..13], "{pods}");
    assert!(web[1].ends_with("ago"), "{pods}");
    assert_eq!(
        &web[2..],
        ["Ready", "web", "default", "0", "host"],
        "{pods}"
    );
    let listed = ctl.json(&["pods", "-o", "json"]);
    assert_eq!(listed["items"][0]["id"], pod.as_str(), "{listed}");

    // A container from crictl's JSON files, one from flags.
    let container_json = dir.path().join("sleeper.json");
    std::fs::write(
        &container_json,
        serde_json::json!({
            "metadata": {"name": "sleeper"},
            "image": {"image": image},
            "command": ["sleep", "1000"],
            "log_path": "sleeper/0.log"
        })
        .to_string(),
    )
    .expect("sleeper.json");
    let sleeper = ctl.ok(&[
        "create",
        &pod,
        container_json.to_str().expect("utf-8"),
        pod_json.to_str().expect("utf-8"),
    ]);
    let sleeper = sleeper.trim().to_owned();
    let echo = ctl.ok(&[
        "create",
        &pod[..13],
        "--image",
        &image,
        "--name",
        "echo",
        "--",
        "sh",
        "-c",
        "echo hello; echo oops >&2",
    ]);
    let echo = echo.trim().to_owned();
    let created = ctl.ok(&["ps", "-a"]);
    assert_eq!(
        row(&created, "sleeper").expect("row")[3],
        "Created",
        "{created}"
    );
    assert_eq!(
        ctl.ok(&["start", &sleeper, &echo]),
        format!("{sleeper}\n{echo}\n")
    );

    // ps: running ones by default, all with -a.
    let running = ctl.ok(&["ps"]);
    assert!(running.starts_with("CONTAINER"), "{running}");
    let row_sleeper = row(&running, "sleeper").expect("sleeper row");
    assert_eq!(row_sleeper[0], &sleeper[..13]);
    assert_eq!(row_sleeper[1], image.as_str());
    assert_eq!(
        &row_sleeper[3..],
        ["Running", "sleeper", "0", &pod[..13], "web"]
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = ctl.json(&["inspect", &echo]);
        if status["status"]["state"] == 2 {
            assert_eq!(status["status"]["exit_code"], 0, "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "echo did not exit: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(row(&ctl.ok(&["ps"]), "echo").is_none());
    let all = ctl.ok(&["ps", "-a"]);
    assert_eq!(row(&all, "echo").expect("echo row")[3], "Exited", "{all}");
    let listed = ctl.json(&["ps", "-a", "-o", "json"]);
    assert_eq!(
        listed["containers"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );

    // exec: streams and exit code, by short id.
    let exec = ctl.output(&[
        "exec",
        &sleeper[..13],
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 4",
    ]);
    assert_eq!(exec.status.code(), Some(4));
    assert_eq!(text(&exec.stdout), "out\n");
    assert_eq!(text(&exec.stderr), "err\n");
    assert_eq!(ctl.ok(&["exec", &sleeper, "--", "id", "-u"]), "1000\n");

    // exec -i and --tty go through huskd's streaming server.
    let exec = ctl.output_with_stdin(
        &[
            "exec",
            "-i",
            &sleeper,
            "--",
            "sh",
            "-c",
            "cat; echo err >&2; exit 5",
        ],
        b"piped in\n",
    );
    assert_eq!(exec.status.code(), Some(5), "{}", text(&exec.stderr));
    assert_eq!(text(&exec.stdout), "piped in\n");
    assert_eq!(text(&exec.stderr), "err\n");
    let tty = ctl.output(&["exec", "--tty", &sleeper, "--", "busybox", "tty"]);
    assert!(tty.status.success(), "{}", text(&tty.stderr));
    assert!(
        text(&tty.stdout).starts_with("/dev/pts/"),
        "{}",
        text(&tty.stdout)
    );
    let attach = ctl.output(&["attach", "-i", &sleeper]);
    assert_eq!(attach.status.code(), Some(1));
    assert!(
        text(&attach.stderr).contains("without stdin"),
        "{}",
        text(&attach.stderr)
    );

    // port-forward: busybox httpd in the pod (the pod shares the host's
    // network on the host driver), reached through a local port.
    let http_port = support::free_port();
    ctl.ok(&[
        "exec",
        &sleeper,
        "--",
        "busybox",
        "httpd",
        "-p",
        &format!("127.0.0.1:{http_port}"),
        "-h",
        "/etc",
    ]);
    let local = support::free_port();
    let mut forward = Command::new(support::huskctl())
        .env("HUSK_SOCKET", &ctl.socket)
        .args(["port-forward", &pod[..13], &format!("{local}:{http_port}")])
        .stdin(Stdio::null())
        .spawn()
        .expect("huskctl port-forward");
    let deadline = Instant::now() + PATIENCE;
    let mut tcp = loop {
        if let Ok(tcp) = std::net::TcpStream::connect(("127.0.0.1", local)) {
            break tcp;
        }
        assert!(Instant::now() < deadline, "port-forward did not listen");
        std::thread::sleep(Duration::from_millis(20));
    };
    tcp.write_all(b"GET /passwd HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    std::io::Read::read_to_string(&mut tcp, &mut response).expect("response");
    assert!(response.contains("husk:x:1000"), "{response}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(forward.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT port-forward");
    assert_eq!(forward.wait().expect("wait").code(), Some(130));

    // logs: the lines without the CRI prefix, on the container's streams.
    let deadline = Instant::now() + PATIENCE;
    let log = loop {
        let out = ctl.output(&["logs", &echo]);
        assert!(out.status.success());
        if !out.stderr.is_empty() && !out.stdout.is_empty() {
            break out;
        }
        assert!(Instant::now() < deadline, "no logs");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(text(&log.stdout), "hello\n");
    assert_eq!(text(&log.stderr), "oops\n");
    let stamped = ctl.ok(&["logs", "--timestamps", &echo]);
    let (time, line) = stamped.trim_end().split_once(' ').expect("time and line");
    assert!(
        chrono::DateTime::parse_from_rfc3339(time).is_ok(),
        "{stamped}"
    );
    assert_eq!(line, "hello");
    // Following an exited container ends by itself.
    assert_eq!(ctl.ok(&["logs", "-f", &echo]), "hello\n");

    // Following a running container: lines as they come, until it exits.
    let ticker = ctl.ok(&[
        "create",
        &pod,
        "--image",
        &image,
        "--name",
        "ticker",
        "--",
        "sh",
        "-c",
        "echo one; sleep 1; echo two",
    ]);
    let ticker = ticker.trim().to_owned();
    ctl.ok(&["start", &ticker]);
    assert_eq!(ctl.ok(&["logs", "-f", &ticker]), "one\ntwo\n");
    assert_eq!(ctl.ok(&["rm", &ticker]), format!("{ticker}\n"));

    // Stop and remove.
    let refused = ctl.output(&["rm", &sleeper]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused.stderr).contains("is running"), "{refused:?}");
    assert_eq!(
        ctl.ok(&["stop", "-t", "1", &sleeper]),
        format!("{sleeper}\n")
    );
    assert_eq!(ctl.ok(&["ps", "-q"]), "");
    assert_eq!(
        ctl.ok(&["rm", &sleeper, &echo]),
        format!("{sleeper}\n{echo}\n")
    );
    assert_eq!(ctl.ok(&["ps", "-a", "-q"]), "");
    assert_eq!(ctl.ok(&["stopp", &pod]), format!("Stopped sandbox {pod}\n"));
    assert_eq!(row(&ctl.ok(&["pods"]), "web").expect("row")[2], "NotReady");
    assert_eq!(ctl.ok(&["rmp", &pod]), format!("Removed sandbox {pod}\n"));
    assert_eq!(ctl.ok(&["pods", "-q"]), "");

    // Errors: one line naming the call, the gRPC status and the socket; exit 1.
    let missing = ctl.output(&["inspect", "0123456789abcdef"]);
    assert_eq!(missing.status.code(), Some(1));
    let message = text(&missing.stderr);
    assert!(
        message.starts_with("huskctl: ContainerStatus 0123456789abcdef: NotFound: ")
            && message.contains(&socket.display().to_string())
            && message.lines().count() == 1,
        "{message}"
    );
}

#[test]
fn an_unreachable_socket_is_one_clear_line_and_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nowhere = dir.path().join("nowhere.sock");
    let ctl = Ctl {
        socket: format!("unix://{}", nowhere.display()),
    };
    let out = ctl.output(&["pods"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "huskctl: cannot reach huskd at {}: no such socket (is huskd running?)\n",
            nowhere.display()
        )
    );
    // A socket nobody listens on any more.
    let dead = dir.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).expect("bind"));
    let out = Command::new(support::huskctl())
        .args(["--socket", dead.to_str().expect("utf-8"), "ps"])
        .output()
        .expect("run huskctl");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "huskctl: cannot reach huskd at {}: connection refused\n",
            dead.display()
        )
    );
}
