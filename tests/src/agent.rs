//! A running agent or waypoint as a test sees it: its log, its admin and
//! control APIs, its own CLI, and the pods it reports.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use anyhow::ensure;
use serde_json::Value;

use crate::{Pod, agent_bin};

pub struct Agent {
    pub(crate) child: Child,
    pub(crate) netns: String,
    pub log: PathBuf,
}

/// An agent (or waypoint) never outlives its test, whoever holds it; a
/// failing test shows its log.
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.log.display(), self.log_text());
        }
    }
}

impl Agent {
    /// An agent started another way (by a container engine): `child` is
    /// the process stopped when the agent is dropped, `netns` the namespace
    /// its ports answer in, `log` where its output goes.
    pub fn adopt(child: Child, netns: &str, log: PathBuf) -> Agent {
        Agent {
            child,
            netns: netns.to_owned(),
            log,
        }
    }

    /// Waits for the agent's process to end, however it was stopped.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (the agent drains: see `mesh-agent node --drain-period`).
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(())
    }

    /// Waits for the process to exit, for at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "agent still running after {limit:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's process ID (the pod shell execs nsenter, which execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One HTTP/1.0 request to the admin server, made from inside the node netns.
    pub fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        self.request(15000, method, path, body)
    }

    /// The agent's `--state-dir`, read from its command line (an agent
    /// started by the harness always gives it).
    pub fn state_dir(&self) -> PathBuf {
        let cmdline = fs::read(format!("/proc/{}/cmdline", self.pid())).unwrap_or_default();
        let mut args = cmdline.split(|b| *b == 0);
        args.find(|a| *a == b"--state-dir");
        args.next()
            .map(|a| PathBuf::from(String::from_utf8_lossy(a).into_owned()))
            .unwrap_or_default()
    }

    /// The agent's control socket, where requests that change anything go.
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir().join("admin.sock")
    }

    /// One HTTP/1.0 request on the agent's control socket.
    pub fn control(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let mut s = std::os::unix::net::UnixStream::connect(self.control_socket())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        exchange(&mut s, method, path, body)
    }

    /// One HTTP/1.0 request to `127.0.0.1:port` inside the node netns.
    pub fn request(
        &self,
        port: u16,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let ns = fs::File::open(format!("/run/netns/{}", self.netns))?;
        std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<(u16, String)> {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                let mut s = TcpStream::connect_timeout(
                    &SocketAddr::from(([127, 0, 0, 1], port)),
                    Duration::from_secs(2),
                )?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                exchange(&mut s, method, path, body)
            })
            .join()
            .expect("http thread")
        })
    }

    /// Runs the agent's own CLI (`mesh-agent pods ...`) inside the node
    /// netns, with the agent's state directory (its control socket).
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(agent_bin())
            .args(args)
            .env("MESH_STATE_DIR", self.state_dir())
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// The pods the agent has enrolled (`GET /pods`), as it reports them.
    pub fn pods(&self) -> anyhow::Result<Vec<Value>> {
        let (status, body) = self.http("GET", "/pods", None)?;
        ensure!(status == 200, "GET /pods answered {status}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// Names of the pods the agent has enrolled.
    pub fn pod_names(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .pods()?
            .iter()
            .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
            .collect())
    }

    /// `mesh-agent pods enroll`, whatever its outcome: (success, stdout, stderr).
    pub fn try_enroll(&self, name: &str, netns: &Path) -> anyhow::Result<(bool, String, String)> {
        self.cli(&[
            "pods",
            "enroll",
            "--name",
            name,
            "--netns",
            netns.to_str().expect("utf8"),
        ])
    }

    pub fn enroll(&self, pod: &Pod) -> anyhow::Result<Value> {
        let (ok, out, err) = self.try_enroll(&pod.name, &pod.netns_path())?;
        ensure!(ok, "enrolling {} failed: {out}{err}", pod.name);
        Ok(serde_json::from_str(&out)?)
    }

    pub fn unenroll(&self, pod: &Pod) -> anyhow::Result<()> {
        let (ok, out, err) = self.cli(&["pods", "unenroll", "--name", &pod.name])?;
        ensure!(ok, "releasing {} failed: {out}{err}", pod.name);
        Ok(())
    }
}

/// Writes one HTTP/1.0 request and reads the whole answer: (status, body).
fn exchange(
    s: &mut (impl Read + Write),
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        body.map_or(0, str::len),
        body.unwrap_or("")
    );
    s.write_all(req.as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).unwrap_or("0").parse()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
