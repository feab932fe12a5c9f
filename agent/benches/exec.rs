//! ExecSync's round trip through the agent on its unix socket, as huskd
//! will make it: ExecProcess of `true`, read stdout and stderr to their
//! end, WaitProcess. Also one container's create → start → first output.
//! Needs root (real namespaces, mounts, cgroups) and Debian's busybox-static.
//!
//! `cargo bench -p husk-agent --bench exec` (HUSK_EXEC_BENCH_RUNS, default 200).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use husk_proto::v1;
use serde_json::json;
use support::{busybox_rootfs_source, spec, Agent};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let runs: usize = std::env::var("HUSK_EXEC_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut agent = Agent::start().await;

    let begin = Instant::now();
    agent
        .create(
            "bench",
            &spec(&["sh", "-c", "echo up; exec sleep 3600"]),
            busybox_rootfs_source(),
        )
        .await
        .expect("create");
    let created = begin.elapsed();
    let mut stdout = agent.output("bench", "", v1::OutputStream::Stdout).await;
    agent
        .client
        .start_container(v1::StartContainerRequest {
            container_id: "bench".into(),
        })
        .await
        .expect("start");
    let first = stdout.message().await.expect("stdout").expect("a chunk");
    let first_output = begin.elapsed();
    assert_eq!(first.data, b"up\n");

    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs {
        let start = Instant::now();
        let (_, _, exit) = agent
            .exec("bench", &format!("e{i}"), json!({"args": ["true"]}), 0)
            .await
            .expect("exec");
        samples.push(start.elapsed());
        assert_eq!(exit.exit_code, 0);
    }
    agent.remove("bench").await;

    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!("container create: {:.2} ms", ms(created));
    println!(
        "container create → start → first output: {:.2} ms",
        ms(first_output)
    );
    println!(
        "exec `true` round trip over {runs} runs: min {:.2} ms, median {:.2} ms, p90 {:.2} ms, max {:.2} ms, mean {:.2} ms",
        ms(at(0.0)),
        ms(at(0.5)),
        ms(at(0.9)),
        ms(at(1.0)),
        ms(mean)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
