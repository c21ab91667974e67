//! The image entrypoint: started from the image metadata with its argv,
//! environment and working directory, supervised, its exit reported.

mod common;

use std::time::{Duration, Instant};

use warren_protocol::{EntrypointState, Reply, Request};

fn status(agent: &mut common::Agent) -> EntrypointState {
    match agent.client.call(Request::EntrypointStatus).unwrap() {
        Reply::Entrypoint(s) => s,
        other => panic!("unexpected reply {other:?}"),
    }
}

fn with_metadata(json: &str) -> (common::Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("image.json");
    std::fs::write(&meta, json).unwrap();
    let agent = common::start_with_args(
        Duration::from_secs(30),
        &[format!("--image-metadata={}", meta.display())],
    );
    (agent, dir)
}

#[test]
fn the_entrypoint_runs_with_the_image_env_and_cwd_and_its_exit_is_reported() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let json = serde_json::json!({
        "argv": ["/bin/sh", "-c", format!("echo \"$GREETING $(pwd)\" > {}; sleep 0.5; exit 3", out.display())],
        "env": ["GREETING=hello"],
        "working_dir": work.path(),
        "user": null,
        "unknown_key": "ignored",
    });
    let (mut agent, _d) = with_metadata(&json.to_string());
    let first = status(&mut agent);
    assert!(
        matches!(&first, EntrypointState::Running { argv, .. } if argv[0] == "/bin/sh")
            || matches!(&first, EntrypointState::Exited { .. }),
        "{first:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let exited = loop {
        match status(&mut agent) {
            EntrypointState::Exited { status, .. } => break status,
            EntrypointState::Running { .. } if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            other => panic!("entrypoint state {other:?}"),
        }
    };
    assert_eq!(exited.code, Some(3));
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.trim(), format!("hello {}", work.path().display()));
}

#[test]
fn bad_metadata_is_reported_not_fatal() {
    let (mut agent, _d) = with_metadata("{not json");
    assert!(
        matches!(status(&mut agent), EntrypointState::Failed { message } if message.contains("not valid image metadata"))
    );
    agent.client.ping(1).unwrap();

    let (mut agent, _d) = with_metadata(r#"{"argv": ["/no/such/program"]}"#);
    assert!(matches!(status(&mut agent), EntrypointState::Failed { message } if message.contains("/no/such/program")));

    let (mut agent, _d) = with_metadata(r#"{"argv": ["/bin/true"], "working_dir": "/no/such/dir"}"#);
    assert!(matches!(status(&mut agent), EntrypointState::Failed { message } if message.contains("/no/such/dir")));

    let (mut agent, _d) = with_metadata(r#"{"argv": ["/bin/true"], "env": ["NOEQUALS"]}"#);
    assert!(matches!(status(&mut agent), EntrypointState::Failed { message } if message.contains("NOEQUALS")));

    let (mut agent, _d) = with_metadata(r#"{"argv": []}"#);
    assert_eq!(status(&mut agent), EntrypointState::None);
}

#[test]
fn without_metadata_there_is_no_entrypoint() {
    let mut agent = common::start();
    assert_eq!(status(&mut agent), EntrypointState::None);
}
