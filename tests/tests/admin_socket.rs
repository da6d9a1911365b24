//! Only root (or the agent's own user) can change what the agent does: the
//! requests that enrol or release pods or change the log level are served
//! on a Unix socket in the state directory, never on the localhost TCP
//! port every host-network process reaches; and a path that is not a
//! network namespace (a FIFO that would block an open) is refused at once.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{Testbed, Value, agent_bin, sh};

/// `mesh-agent pods ARGS` as user 65534 (nobody), with the agent's state
/// directory: (success, stdout, stderr).
fn cli_as_nobody(
    tb: &Testbed,
    state_dir: &Path,
    args: &[&str],
) -> anyhow::Result<(bool, String, String)> {
    // A copy anyone may run, outside root's home and build tree.
    let bin = tb.workdir().join("mesh-agent-nobody");
    if !bin.exists() {
        std::fs::copy(agent_bin(), &bin)?;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(tb.workdir(), std::fs::Permissions::from_mode(0o755))?;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args(args)
        .env("MESH_STATE_DIR", state_dir)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn changes_go_only_through_the_control_socket_and_a_fifo_is_refused_at_once() -> anyhow::Result<()>
{
    let mut tb = Testbed::new(1)?;
    let pod = tb.add_pod(0, "default/app")?;
    tb.start_agent(0, &[])?;
    let a = tb.agent(0);
    let body = serde_json::json!({"name": pod.name, "netns": pod.netns_path()}).to_string();

    // The TCP admin port: read-only.
    for (path, body) in [
        ("/pods/enroll", Some(body.as_str())),
        ("/pods/unenroll", Some(r#"{"name": "default/app"}"#)),
        ("/logging?level=trace", None),
    ] {
        let (status, answer) = a.http("POST", path, body)?;
        assert_eq!(status, 405, "POST {path} on TCP: {answer}");
        assert!(
            answer.contains("control socket") && answer.contains("mesh-agent pods"),
            "the refusal says where to go: {answer}"
        );
    }
    assert_eq!(a.pod_names()?, Vec::<String>::new(), "nothing enrolled");
    assert_eq!(
        a.http("GET", "/logging", None)?.0,
        200,
        "reading still works"
    );

    // The socket: root only (its mode), and by its peer credentials.
    let socket = a.control_socket();
    let mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", socket.display());
    let state_dir = a.state_dir();
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o755))?;
    let netns = pod.netns_path().display().to_string();
    let enroll = ["pods", "enroll", "--name", "default/app", "--netns", &netns];
    let (ok, _, err) = cli_as_nobody(&tb, &state_dir, &enroll)?;
    assert!(!ok, "nobody may not enrol");
    assert!(
        err.contains(&socket.display().to_string()) && err.contains("Permission denied"),
        "{err}"
    );
    // Even with the file opened to all by mistake, the agent checks who calls.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    let (ok, _, err) = cli_as_nobody(&tb, &state_dir, &enroll)?;
    assert!(!ok, "nobody may not enrol");
    assert!(
        err.contains("caller uid 65534 refused") && err.contains("403"),
        "{err}"
    );
    assert_eq!(a.pod_names()?, Vec::<String>::new(), "nothing enrolled");

    // A FIFO as the namespace: refused at once, and nothing waits on it.
    let fifo = tb.workdir().join("not-a-netns");
    sh("mkfifo", &[fifo.to_str().expect("utf8")])?;
    let started = Instant::now();
    let (ok, _, err) = a.try_enroll("default/fifo", &fifo)?;
    assert!(!ok);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused in {:?}",
        started.elapsed()
    );
    assert!(
        err.contains("is not a network namespace handle") && err.contains("400"),
        "{err}"
    );
    // Root, through the CLI, enrols: the agent kept serving.
    let info: Value = a.enroll(&pod)?;
    assert_eq!(info["name"], "default/app");
    assert_eq!(a.pod_names()?, ["default/app"]);
    let (ok, _, err) = a.cli(&["pods", "unenroll", "--name", "default/app"])?;
    assert!(ok, "{err}");
    Ok(())
}
