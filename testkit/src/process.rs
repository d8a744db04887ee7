//! A child server process with its log in a file: what the fixtures share.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server gets to accept connections, or to exit after SIGTERM. Generous: tests run
/// in parallel with compilation on 2 cores.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) struct ServerProcess {
    name: &'static str,
    log_path: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    pub(crate) fn new(name: &'static str, log_path: PathBuf) -> Self {
        Self {
            name,
            log_path,
            child: None,
        }
    }

    /// Spawns `command` with stdout and stderr appended to the log file. Returns `Err` with the
    /// log's tail when the process exits or `ready` is not true within [`TIMEOUT`].
    pub(crate) fn spawn(
        &mut self,
        mut command: Command,
        ready: impl Fn() -> bool,
    ) -> Result<(), String> {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = self.open_log();
        let err = log.try_clone().expect("clone log file handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", command.get_program()));
        self.child = Some(child);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "{} exited with {status}:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            if ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "{} was not ready after {TIMEOUT:?}:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The running process's id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub(crate) fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL and reap: a crash.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`pause`) or SIGCONT: a process that hangs, its sockets still open.
    pub(crate) fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the process runs").to_string();
        // std has no such signals and the workspace forbids `unsafe`: use kill(1).
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill {signal} {pid}: {status}");
    }

    /// Blocks until every thread of the process is stopped (after SIGSTOP). The signal takes
    /// effect lazily: a thread running on another CPU stops when that CPU is interrupted,
    /// which on a virtual machine under load can take milliseconds, long enough for the
    /// process to answer a request sent after `kill` returned.
    pub(crate) fn wait_stopped(&self) {
        let pid = self.pid().expect("the process runs");
        let deadline = std::time::Instant::now() + TIMEOUT;
        let stopped = || {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
            let mut all = true;
            for task in tasks {
                let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
                // The state is the field after the command name, which is in parentheses.
                let state = stat.rsplit(')').next()?.split_whitespace().next()?;
                all &= state == "T" || state == "t";
            }
            Some(all)
        };
        while stopped() != Some(true) {
            assert!(
                std::time::Instant::now() < deadline,
                "process {pid} not stopped after {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGTERM, then SIGKILL if the process has not exited within [`TIMEOUT`].
    pub(crate) fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // std has no SIGTERM and the workspace forbids `unsafe` (so no libc::kill): use kill(1).
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn open_log(&self) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path.display()))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes `text` to `path`, panicking with the path on failure.
pub(crate) fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Runs `attempt` up to three times, until it succeeds; panics with `what` and every attempt's
/// error. How the fixtures start servers: a free port can be taken by someone else between our
/// probe and the server's bind, and a stopped server's port may linger a moment; `attempt` does
/// what each retry needs (a fresh port, a pause).
pub(crate) fn three_tries(what: &str, mut attempt: impl FnMut() -> Result<(), String>) {
    let mut errors = Vec::new();
    for _ in 0..3 {
        match attempt() {
            Ok(()) => return,
            Err(e) => errors.push(e),
        }
    }
    panic!("{what}:\n{}", errors.join("\n---\n"));
}
