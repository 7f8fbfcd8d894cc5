//! The `local` backend: agents as processes on this machine, one directory each under
//! `local/<node-id>/` (its `agent.toml`, `agent.pid`, `agent.log` and state). The directory is
//! what the `fleet` tag is on EC2: it is how the fleet finds its own nodes again.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use fleet_common::process;

use indicatif::ProgressBar;

use super::{Backend, NodeInfo};
use crate::config::Fleet;

const STOP_GRACE: Duration = Duration::from_secs(10);

pub struct Local {
    fleet: Fleet,
    agent_bin: PathBuf,
}

/// The agent binary: configured, else beside this `fleet` binary, else on `$PATH`.
pub fn find_agent(configured: &str) -> PathBuf {
    if !configured.is_empty() {
        return PathBuf::from(configured);
    }
    if let Ok(me) = std::env::current_exe() {
        let sibling = me.with_file_name("fleet-agent");
        if sibling.is_file() {
            return sibling;
        }
    }
    PathBuf::from("fleet-agent")
}

/// Whether `pid` (read from a node's `agent.pid`) is still that node's agent.
fn pid_alive(pid: u32) -> bool {
    process::alive_as(pid, |args| args.iter().any(|a| a.contains("fleet-agent")))
}

impl Local {
    pub fn new(fleet: &Fleet) -> Local {
        Local {
            agent_bin: find_agent(&fleet.config.local.agent_bin),
            fleet: fleet.clone(),
        }
    }

    fn dir(&self) -> PathBuf {
        self.fleet.local_dir()
    }

    fn pid_of(dir: &Path) -> Option<u32> {
        std::fs::read_to_string(dir.join("agent.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn agent_config(&self, id: &str, node_dir: &Path) -> Result<String> {
        let f = &self.fleet;
        let l = &f.config.local;
        let abs = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
        let mut t = toml::Table::new();
        t.insert("controller".into(), f.config.controller.url.clone().into());
        t.insert(
            "ca_file".into(),
            abs(f.ca_pem()).display().to_string().into(),
        );
        t.insert(
            "token_file".into(),
            abs(f.agent_token()).display().to_string().into(),
        );
        t.insert("verify_key".into(), f.read(&f.verify_key())?.trim().into());
        t.insert("fleet".into(), f.config.name.clone().into());
        t.insert(
            "state_dir".into(),
            abs(node_dir.to_path_buf())
                .join("state")
                .display()
                .to_string()
                .into(),
        );
        t.insert("node_id".into(), id.into());
        t.insert("backend".into(), "local".into());
        // Local agents are configured by this file alone: no user-data over IMDS.
        t.insert("imds".into(), false.into());
        t.insert("workers".into(), i64::from(l.workers).into());
        t.insert("locust".into(), l.locust.clone().into());
        if let Some(cmd) = &l.worker_command {
            t.insert(
                "worker_command".into(),
                toml::Value::Array(cmd.iter().map(|s| s.clone().into()).collect()),
            );
        }
        for (k, v) in &l.agent_settings {
            t.insert(k.clone(), v.clone());
        }
        Ok(toml::to_string(&t)?)
    }

    fn launch_one(&self, id: &str) -> Result<NodeInfo> {
        let node_dir = self.dir().join(id);
        std::fs::create_dir_all(&node_dir)?;
        let cfg_path = node_dir.join("agent.toml");
        std::fs::write(&cfg_path, self.agent_config(id, &node_dir)?)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node_dir.join("agent.log"))?;
        let child = tokio::process::Command::new(&self.agent_bin)
            .arg("--config")
            .arg(&cfg_path)
            .current_dir(&node_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .with_context(|| {
                format!("cannot start {}; build it with `cargo build` or set local.agent_bin in fleet.toml", self.agent_bin.display())
            })?;
        let pid = child.id().unwrap_or(0);
        // Dropping the handle does not stop the agent; tokio reaps it when it exits.
        drop(child);
        std::fs::write(node_dir.join("agent.pid"), pid.to_string())?;
        Ok(NodeInfo {
            id: id.into(),
            state: "running".into(),
            live: true,
            stopped: false,
            place: "localhost".into(),
            kind: "process".into(),
            launched: now_s(),
        })
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Backend for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn observe(&self) -> Result<Vec<NodeInfo>> {
        let mut out = vec![];
        let Ok(rd) = std::fs::read_dir(self.dir()) else {
            return Ok(out);
        };
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            if !id.starts_with("local-") {
                continue;
            }
            let launched = std::fs::metadata(e.path().join("agent.pid"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let live = Self::pid_of(&e.path()).is_some_and(pid_alive);
            out.push(NodeInfo {
                id,
                state: if live { "running" } else { "dead" }.into(),
                live,
                stopped: false,
                place: "localhost".into(),
                kind: "process".into(),
                launched,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn launch(&self, count: usize, progress: &ProgressBar) -> Result<Vec<NodeInfo>> {
        std::fs::create_dir_all(self.dir())?;
        let taken: std::collections::HashSet<String> =
            self.observe().await?.into_iter().map(|n| n.id).collect();
        let mut out = vec![];
        let mut i = 1;
        while out.len() < count {
            let id = format!("local-{i:04}");
            i += 1;
            if taken.contains(&id) {
                continue;
            }
            out.push(self.launch_one(&id)?);
            progress.set_position(out.len() as u64);
        }
        Ok(out)
    }

    async fn terminate(&self, ids: &[String], progress: &ProgressBar) -> Result<()> {
        let mut pids = vec![];
        for id in ids {
            anyhow::ensure!(
                id.starts_with("local-") && !id.contains('/'),
                "not a local node id: {id:?}"
            );
            let dir = self.dir().join(id);
            // Each agent leads a process group of its own (its workers have theirs).
            pids.extend(Self::pid_of(&dir).filter(|p| pid_alive(*p)));
        }
        process::stop_groups(&pids, STOP_GRACE, pid_alive).await;
        for id in ids {
            let _ = std::fs::remove_dir_all(self.dir().join(id));
        }
        progress.set_position(ids.len() as u64);
        Ok(())
    }
}
