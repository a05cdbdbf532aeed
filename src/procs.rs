//! Child processes of a local cluster (the coord and the servers, as roles of the `demo`
//! binary), each logging to its own file, killed (SIGKILL) by their own handles when dropped.
//! Used by `demo` and by `bench --failover`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kvraft_common::ClusterConfig;

/// The child processes, killed (SIGKILL) when dropped.
pub struct Procs {
    exe: PathBuf,
    config: PathBuf,
    log_dir: PathBuf,
    children: BTreeMap<String, Child>,
}

impl Procs {
    /// No children yet; `exe` is run as `exe --config <config> <role args>`.
    pub fn new(exe: PathBuf, config: PathBuf, log_dir: PathBuf) -> Procs {
        Procs {
            exe,
            config,
            log_dir,
            children: BTreeMap::new(),
        }
    }

    pub fn start(&mut self, name: &str, role_args: &[String]) -> anyhow::Result<()> {
        let log_path = self.log_dir.join(format!("{name}.log"));
        let log = File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let child = Command::new(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .args(role_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.children.insert(name.to_string(), child);
        Ok(())
    }

    /// The coord and every server of `config`.
    pub fn start_cluster(&mut self, config: &ClusterConfig) -> anyhow::Result<()> {
        self.start("coord", &["coord".into()])?;
        for s in &config.servers {
            self.start_server(s.id)?;
        }
        Ok(())
    }

    /// Server `id`, as the child named `server<id>`.
    pub fn start_server(&mut self, id: u32) -> anyhow::Result<()> {
        self.start(&format!("server{id}"), &["server".into(), id.to_string()])
    }

    /// SIGKILL of server `id` (see [`Procs::start_server`]).
    pub fn kill_server(&mut self, id: u32) {
        self.kill(&format!("server{id}"));
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to server `id`'s process, by its pid.
    pub fn signal_server(&self, id: u32, signal: &str) -> anyhow::Result<()> {
        let name = format!("server{id}");
        let child = self
            .children
            .get(&name)
            .with_context(|| format!("{name} is not running"))?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .context("cannot run kill")?;
        anyhow::ensure!(
            status.success(),
            "kill -{signal} of {name} failed: {status}"
        );
        Ok(())
    }

    /// Waits until the coord names a leader, failing if a child exits or `timeout` passes.
    pub async fn wait_for_leader(
        &mut self,
        config: &ClusterConfig,
        timeout: Duration,
    ) -> anyhow::Result<kvslib::LeaderInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if let Ok(info) = kvslib::query_leader(config, "procs").await {
                if info.has_leader() {
                    return Ok(info);
                }
            }
            if Instant::now() > deadline {
                bail!("no leader within {timeout:?}; see the logs");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self, name: &str) {
        if let Some(mut child) = self.children.remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Fails with the tail of its log if a child has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        let exited = self
            .children
            .iter_mut()
            .find_map(|(name, child)| Some((name.clone(), child.try_wait().ok()??)));
        let Some((name, status)) = exited else {
            return Ok(());
        };
        self.children.remove(&name);
        let log = self.log_dir.join(format!("{name}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(5)..];
        bail!(
            "{name} exited ({status}); end of {}:\n{}",
            log.display(),
            tail.join("\n")
        )
    }

    /// Waits (bounded) for children that got Ctrl-C with us, then kills what is left.
    pub fn stop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, child) in self.children.iter_mut() {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let names: Vec<String> = self.children.keys().cloned().collect();
        for name in names {
            self.kill(&name);
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        let names: Vec<String> = self.children.keys().cloned().collect();
        for name in names {
            self.kill(&name);
        }
    }
}
