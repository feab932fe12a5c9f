//! The agent's containers on the host, as the host sandbox driver uses it:
//! the real binary on a unix socket, driven with the generated client, with
//! real namespaces, mounts, cgroups and a busybox rootfs. Needs root.

mod support;

use std::time::Duration;

use husk_e2e::mounts_below;
use husk_proto::v1::{self, rootfs_source};
use serde_json::json;
use support::{busybox_rootfs_source, process, spec, Agent};
use tonic::Code;

#[tokio::test]
async fn runs_a_container_to_its_exit_with_both_streams() {
    let mut agent = Agent::start().await;
    let (stdout, stderr, status) = agent
        .run(
            "lifecycle",
            &spec(&[
                "sh",
                "-c",
                "echo out; echo err >&2; echo pid=$$ host=$(hostname); exit 3",
            ]),
        )
        .await;
    assert_eq!(stdout, "out\npid=1 host=husk-test\n");
    assert_eq!(stderr, "err\n");
    assert_eq!(status.exit_code, 3);
    assert_eq!(status.reason, "Error");
    assert!(status.started_at_ns > 0 && status.finished_at_ns >= status.started_at_ns);
    assert!(
        mounts_below(&agent.state_dir()).is_empty(),
        "{:?}",
        mounts_below(&agent.state_dir())
    );
}

#[tokio::test]
async fn reports_states_and_refuses_what_does_not_fit_them() {
    let mut agent = Agent::start().await;
    agent
        .create("states", &spec(&["sleep", "30"]), busybox_rootfs_source())
        .await
        .expect("create");
    let state =
        |s: v1::ContainerStatusResponse| v1::ContainerState::try_from(s.state).expect("state");
    let status = agent
        .client
        .container_status(v1::ContainerStatusRequest {
            container_id: "states".into(),
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(state(status), v1::ContainerState::Created);

    let err = agent
        .create("states", &spec(&["true"]), busybox_rootfs_source())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");

    agent
        .client
        .start_container(v1::StartContainerRequest {
            container_id: "states".into(),
        })
        .await
        .expect("start");
    let status = agent
        .client
        .container_status(v1::ContainerStatusRequest {
            container_id: "states".into(),
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(state(status), v1::ContainerState::Running);
    let err = agent
        .client
        .remove_container(v1::RemoveContainerRequest {
            container_id: "states".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

    agent
        .client
        .signal_process(v1::SignalProcessRequest {
            process: Some(process("states", "")),
            signal: 9,
        })
        .await
        .expect("kill");
    let exit = agent.wait("states", "").await;
    assert_eq!((exit.exit_code, exit.signal), (137, 9));
    let status = agent
        .client
        .container_status(v1::ContainerStatusRequest {
            container_id: "states".into(),
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(state(status), v1::ContainerState::Exited);
    agent
        .client
        .remove_container(v1::RemoveContainerRequest {
            container_id: "states".into(),
            force: false,
        })
        .await
        .expect("remove exited");
    let err = agent
        .client
        .container_status(v1::ContainerStatusRequest {
            container_id: "states".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn signals_reach_the_containers_process() {
    let mut agent = Agent::start().await;
    let script = "trap 'echo got TERM; exit 7' TERM; echo ready; while true; do sleep 0.1; done";
    agent
        .create(
            "signals",
            &spec(&["sh", "-c", script]),
            busybox_rootfs_source(),
        )
        .await
        .expect("create");
    let mut stdout = agent.output("signals", "", v1::OutputStream::Stdout).await;
    agent
        .client
        .start_container(v1::StartContainerRequest {
            container_id: "signals".into(),
        })
        .await
        .expect("start");
    // The trap is set once the script says ready: only then may TERM come
    // (PID 1 of a namespace ignores a signal it has no handler for).
    let first = tokio::time::timeout(support::PATIENCE, stdout.message())
        .await
        .expect("ready in time")
        .expect("stdout")
        .expect("a chunk");
    assert_eq!(first.data, b"ready\n");
    agent
        .client
        .signal_process(v1::SignalProcessRequest {
            process: Some(process("signals", "")),
            signal: 15,
        })
        .await
        .expect("TERM");
    let exit = agent.wait("signals", "").await;
    assert_eq!(exit.exit_code, 7);
    let mut rest = Vec::new();
    while let Some(chunk) = stdout.message().await.expect("stdout") {
        rest.extend(chunk.data);
    }
    assert_eq!(String::from_utf8_lossy(&rest), "got TERM\n");
    agent.remove("signals").await;
}

#[tokio::test]
async fn execs_with_and_without_a_tty_and_with_stdin() {
    let mut agent = Agent::start().await;
    agent.create_running("execs", &spec(&["sleep", "60"])).await;

    let (out, err, exit) = agent
        .exec(
            "execs",
            "plain",
            json!({"args": ["sh", "-c", "echo out; echo err >&2; exit 4"]}),
            0,
        )
        .await
        .expect("exec");
    assert_eq!(
        (out.as_str(), err.as_str(), exit.exit_code),
        ("out\n", "err\n", 4)
    );

    let (out, _, exit) = agent
        .exec(
            "execs",
            "tty",
            json!({"args": ["sh", "-c", "tty; stty size"], "terminal": true}),
            0,
        )
        .await
        .expect("tty exec");
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert_eq!(exit.exit_code, 0);

    // A resize reaches the exec's terminal.
    agent
        .client
        .exec_process(v1::ExecProcessRequest {
            container_id: "execs".into(),
            exec_id: "resize".into(),
            oci_process_json: serde_json::to_vec(
                &json!({"args": ["sh", "-c", "sleep 1; stty size"], "terminal": true}),
            )
            .expect("json"),
            stdin: false,
            timeout_ms: 0,
        })
        .await
        .expect("exec");
    let stdout = agent
        .collect("execs", "resize", v1::OutputStream::Stdout)
        .await;
    agent
        .client
        .resize_tty(v1::ResizeTtyRequest {
            process: Some(process("execs", "resize")),
            rows: 33,
            cols: 101,
        })
        .await
        .expect("resize");
    assert_eq!(agent.wait("execs", "resize").await.exit_code, 0);
    assert_eq!(stdout.await.expect("stdout").trim(), "33 101");

    // An exec sees the container's namespaces: its PID 1 is the container's sleep.
    let (out, _, _) = agent
        .exec(
            "execs",
            "ns",
            json!({"args": ["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname"]}),
            0,
        )
        .await
        .expect("exec");
    assert_eq!(out, "sleep 60 \nhusk-test\n");

    // stdin, through WriteStdin.
    agent
        .start_exec("execs", "stdin", &json!({"args": ["cat"]}), true)
        .await
        .expect("exec cat");
    let stdout = agent
        .collect("execs", "stdin", v1::OutputStream::Stdout)
        .await;
    let chunks = vec![
        v1::StdinChunk {
            process: Some(process("execs", "stdin")),
            data: b"hello ".to_vec(),
            close_stdin: false,
        },
        v1::StdinChunk {
            process: None,
            data: b"stdin\n".to_vec(),
            close_stdin: true,
        },
    ];
    let written = agent
        .client
        .write_stdin(tokio_stream::iter(chunks))
        .await
        .expect("write stdin")
        .into_inner();
    assert_eq!(written.bytes_written, 12);
    assert_eq!(stdout.await.expect("stdout"), "hello stdin\n");
    assert_eq!(agent.wait("execs", "stdin").await.exit_code, 0);

    // A running exec's id is taken; an exited one's may be reused.
    agent
        .start_exec("execs", "long", &json!({"args": ["sleep", "30"]}), false)
        .await
        .expect("exec sleep");
    let err = agent
        .exec("execs", "long", json!({"args": ["true"]}), 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    let (_, _, exit) = agent
        .exec("execs", "plain", json!({"args": ["true"]}), 0)
        .await
        .expect("reuse");
    assert_eq!(exit.exit_code, 0);
    agent.remove("execs").await;
}

#[tokio::test]
async fn an_exec_past_its_timeout_is_killed() {
    let mut agent = Agent::start().await;
    agent
        .create_running("timeout", &spec(&["sleep", "60"]))
        .await;
    let (_, _, exit) = agent
        .exec("timeout", "slow", json!({"args": ["sleep", "30"]}), 300)
        .await
        .expect("exec");
    assert!(exit.timed_out, "{exit:?}");
    assert_eq!(
        (exit.exit_code, exit.signal, exit.reason.as_str()),
        (137, 9, "Timeout")
    );
    agent.remove("timeout").await;
}

#[tokio::test]
async fn an_oom_kill_is_reported_as_oomkilled() {
    let mut agent = Agent::start().await;
    let mut spec = spec(&[
        "sh",
        "-c",
        "echo start; exec dd if=/dev/zero of=/dev/null bs=200M count=1",
    ]);
    spec["linux"]["resources"] = json!({"memory": {"limit": 32 << 20, "swap": 32 << 20}});
    let (stdout, stderr, exit) = agent.run("oom", &spec).await;
    assert!(
        exit.oom_killed,
        "{exit:?} stdout {stdout:?} stderr {stderr:?}"
    );
    assert_eq!((exit.exit_code, exit.reason.as_str()), (137, "OOMKilled"));

    // As containerd reports it: an OOM kill of any process in the container
    // marks it OOMKilled; the exit code stays the main process's.
    let mut child_killed = spec.clone();
    child_killed["process"]["args"] = json!([
        "sh",
        "-c",
        "dd if=/dev/zero of=/dev/null bs=200M count=1; exit 3"
    ]);
    let (_, _, exit) = agent.run("oom-child", &child_killed).await;
    assert!(exit.oom_killed, "{exit:?}");
    assert_eq!((exit.exit_code, exit.reason.as_str()), (3, "OOMKilled"));
}

#[tokio::test]
async fn user_groups_capabilities_seccomp_and_readonly_rootfs_are_applied() {
    let mut agent = Agent::start().await;

    let mut as_user = spec(&["id"]);
    as_user["process"]["user"] = json!({"uid": 1000, "gid": 1001, "additionalGids": [2000, 2001]});
    let (out, _, _) = agent.run("user", &as_user).await;
    // The supplementary groups are exactly those asked for (containerd adds the primary gid itself).
    assert_eq!(out.trim(), "uid=1000 gid=1001 groups=2000,2001", "{out}");

    let mut few_caps = spec(&[
        "sh",
        "-c",
        "grep -E '^Cap(Eff|Bnd)' /proc/self/status; grep NoNewPrivs /proc/self/status",
    ]);
    for set in ["bounding", "effective", "permitted"] {
        few_caps["process"]["capabilities"][set] = json!(["CAP_CHOWN", "CAP_KILL"]);
    }
    let (out, _, _) = agent.run("caps", &few_caps).await;
    assert!(out.contains("CapEff:\t0000000000000021"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000021"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");

    let mut filtered = spec(&["sh", "-c", "mkdir /tmp/x && echo made; echo still here"]);
    filtered["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let (out, err, _) = agent.run("seccomp", &filtered).await;
    assert_eq!(out, "still here\n");
    assert!(err.contains("Operation not permitted"), "{err}");

    let mut readonly = spec(&[
        "sh",
        "-c",
        "touch /x || echo refused; touch /tmp/y || echo tmp too",
    ]);
    readonly["root"]["readonly"] = json!(true);
    let (out, err, _) = agent.run("readonly", &readonly).await;
    assert!(out.starts_with("refused"), "{out} {err}");
    assert!(err.contains("Read-only file system"), "{err}");
}

#[tokio::test]
async fn stats_move_when_the_container_burns_cpu_and_memory() {
    let mut agent = Agent::start().await;
    let script = "x=$(head -c 40000000 /dev/zero | tr '\\0' a); while true; do :; done";
    agent
        .create(
            "stats",
            &spec(&["sh", "-c", script]),
            busybox_rootfs_source(),
        )
        .await
        .expect("create");
    agent
        .client
        .start_container(v1::StartContainerRequest {
            container_id: "stats".into(),
        })
        .await
        .expect("start");
    let sample = |agent: &mut Agent| {
        let mut client = agent.client.clone();
        async move {
            let stats = client
                .stats(v1::StatsRequest {
                    container_ids: vec!["stats".into()],
                })
                .await
                .expect("stats")
                .into_inner()
                .stats;
            stats.into_iter().next().expect("one container")
        }
    };
    let first = sample(&mut agent).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = sample(&mut agent).await;
    assert!(
        second.cpu_usage_ns > first.cpu_usage_ns + 100_000_000,
        "{first:?} → {second:?}"
    );
    assert!(second.memory_usage_bytes > 30 << 20, "{second:?}");
    assert!(
        second.memory_working_set_bytes > 0 && second.pids >= 1,
        "{second:?}"
    );
    agent.remove("stats").await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_the_agent_keeps_serving() {
    let mut agent = Agent::start().await;
    let start = |agent: &mut Agent, id: &str| {
        let mut client = agent.client.clone();
        let id = id.to_string();
        async move {
            client
                .start_container(v1::StartContainerRequest { container_id: id })
                .await
        }
    };
    let err = start(&mut agent, "nobody").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");

    let mut relative = spec(&["true"]);
    relative["process"]["cwd"] = json!("tmp");
    let err = agent
        .create("relative", &relative, busybox_rootfs_source())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    let mut escaping = spec(&["true"]);
    escaping["mounts"] = json!([{"destination": "/../../etc", "type": "tmpfs", "source": "tmpfs"}]);
    let err = agent
        .create("escaping", &escaping, busybox_rootfs_source())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    let err = agent
        .create(
            "no-rootfs",
            &spec(&["true"]),
            rootfs_source::Source::Directory("/nonexistent/rootfs".into()),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("/nonexistent/rootfs"), "{err}");

    let err = agent
        .create("../evil", &spec(&["true"]), busybox_rootfs_source())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    let mut huge = spec(&["true"]);
    huge["process"]["env"] = json!([format!("BIG={}", "x".repeat(1_500_000))]);
    let err = agent
        .create("huge", &huge, busybox_rootfs_source())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    agent
        .create(
            "missing-command",
            &spec(&["no-such-command"]),
            busybox_rootfs_source(),
        )
        .await
        .expect("create");
    let err = start(&mut agent, "missing-command").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("executable file not found in $PATH"),
        "{err}"
    );
    let exit = agent.wait("missing-command", "").await;
    assert_eq!((exit.exit_code, exit.reason.as_str()), (128, "StartError"));
    agent.remove("missing-command").await;

    agent
        .client
        .ping(v1::PingRequest {})
        .await
        .expect("still serving");
    assert!(
        mounts_below(&agent.state_dir()).is_empty(),
        "{:?}",
        mounts_below(&agent.state_dir())
    );
    let left: Vec<_> = std::fs::read_dir(agent.state_dir().join("containers"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "container directories left: {left:?}");
}

#[tokio::test]
async fn a_block_device_rootfs_is_mounted_read_only_under_a_writable_layer() {
    let mut agent = Agent::start().await;
    let image = agent.dir.path().join("rootfs.erofs");
    let mkfs = std::process::Command::new("mkfs.erofs")
        .arg(&image)
        .arg(support::busybox_rootfs())
        .output()
        .expect("mkfs.erofs (erofs-utils; run scripts/install-deps.sh)");
    assert!(
        mkfs.status.success(),
        "{}",
        String::from_utf8_lossy(&mkfs.stderr)
    );
    let losetup = std::process::Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(&image)
        .output()
        .expect("losetup");
    assert!(
        losetup.status.success(),
        "{}",
        String::from_utf8_lossy(&losetup.stderr)
    );
    let device = String::from_utf8_lossy(&losetup.stdout).trim().to_string();

    let spec = spec(&[
        "sh",
        "-c",
        "echo data > /new-file && cat /new-file && ls /bin/busybox",
    ]);
    agent
        .create(
            "erofs",
            &spec,
            rootfs_source::Source::BlockDevice(device.clone()),
        )
        .await
        .expect("create");
    let stdout = agent.collect("erofs", "", v1::OutputStream::Stdout).await;
    agent
        .client
        .start_container(v1::StartContainerRequest {
            container_id: "erofs".into(),
        })
        .await
        .expect("start");
    let exit = agent.wait("erofs", "").await;
    let stats = agent
        .client
        .stats(v1::StatsRequest {
            container_ids: vec!["erofs".into()],
        })
        .await
        .expect("stats")
        .into_inner();
    agent.remove("erofs").await;
    let _ = std::process::Command::new("losetup")
        .arg("-d")
        .arg(&device)
        .status();
    assert_eq!(stdout.await.expect("stdout"), "data\n/bin/busybox\n");
    assert_eq!(exit.exit_code, 0);
    assert!(stats.stats[0].writable_layer_bytes > 0, "{stats:?}");
}
