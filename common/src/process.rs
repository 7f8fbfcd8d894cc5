//! Processes and process groups: whether a pid is still a live process (read from `/proc`),
//! and the one way fleet stops a process group.
//!
//! Everything fleet starts (the agent's workers, the Locust master, local agents) runs in a
//! process group of its own, so a stop reaches anything it spawned: SIGTERM to the group, a
//! grace period for the leader to exit, then SIGKILL to whatever is left in the group.
//!
//! A zombie counts as gone: its process has exited, and only its exit status waits for the
//! parent (or init) to collect it. Pids are reused, so a pid found again later (in a pid file,
//! in saved state) is trusted only while its command line says it is ours ([`alive_as`]).

use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::killpg;
pub use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::Child;

/// How often a group that is not our child is looked up while it has time to exit.
const GONE_POLL: Duration = Duration::from_millis(50);

/// The fields of `/proc/<pid>/stat` after the command name, if the process exists. The name
/// (in parentheses) may hold spaces and parentheses, so the split is at the last `)`: the
/// state letter is the first field returned, the start time (field 22) the 20th.
pub fn stat(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The state letter (`R`, `S`, `Z`...), if the process exists.
pub fn state(pid: u32) -> Option<char> {
    stat(pid)?.first()?.chars().next()
}

/// Whether `pid` is a process that has not exited: it exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    matches!(state(pid), Some(c) if c != 'Z' && c != 'X')
}

/// The command line's arguments; empty if the process is gone.
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .split('\0')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` is alive and its arguments satisfy `ours`: a pid read back from a file.
pub fn alive_as(pid: u32, ours: impl Fn(&[String]) -> bool) -> bool {
    alive(pid) && ours(&cmdline(pid))
}

/// Sends `sig` to process group `pgid`. ESRCH (already gone) is the normal case after the
/// leader exits, so no error is reported.
pub fn signal_group(pgid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pgid) {
        if p > 0 {
            let _ = killpg(Pid::from_raw(p), sig);
        }
    }
}

/// Stops our child's process group `pgid` (the child leads it): SIGTERM, up to `grace` for the
/// child to exit, then SIGKILL to the group. Returns the child's exit status.
pub async fn stop_child(child: &mut Child, pgid: u32, grace: Duration) -> Option<ExitStatus> {
    signal_group(pgid, Signal::SIGTERM);
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(s) => s.ok(),
        Err(_) => {
            signal_group(pgid, Signal::SIGKILL);
            child.wait().await.ok()
        }
    };
    // The leader is gone; whatever it left behind in its group is not.
    signal_group(pgid, Signal::SIGKILL);
    status
}

/// Stops process groups whose leaders are not our children (a master adopted from a previous
/// controller, local agents found by pid file): SIGTERM to each, up to `grace` for every
/// leader to be gone by `alive`, then SIGKILL to each group.
pub async fn stop_groups(pgids: &[u32], grace: Duration, alive: impl Fn(u32) -> bool) {
    for p in pgids {
        signal_group(*p, Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    while pgids.iter().any(|p| alive(*p)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(GONE_POLL).await;
    }
    for p in pgids {
        signal_group(*p, Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::time::Instant;

    fn sh(script: &str) -> (Child, u32) {
        let child = tokio::process::Command::new("sh")
            .args(["-c", script])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        (child, pid)
    }

    /// Waits until `sh` has run its `trap` (and so ignores SIGTERM): it writes `ready`.
    async fn ready(path: &std::path::Path) -> u32 {
        for _ in 0..250 {
            if let Some(p) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} was never written", path.display());
    }

    #[tokio::test]
    async fn a_child_that_honours_sigterm_stops_without_waiting_for_the_grace() {
        let (mut child, pid) = sh("exec sleep 60");
        let t = Instant::now();
        let status = stop_child(&mut child, pid, Duration::from_secs(5)).await;
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(Signal::SIGTERM as i32)
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(!alive(pid));
    }

    #[tokio::test]
    async fn a_child_that_ignores_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ready");
        let (mut child, pid) = sh(&format!(
            "trap '' TERM; echo $$ > {}; sleep 60",
            f.display()
        ));
        ready(&f).await;
        let t = Instant::now();
        let status = stop_child(&mut child, pid, Duration::from_millis(300)).await;
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "killed before the grace"
        );
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(Signal::SIGKILL as i32)
        );
    }

    /// The leader and a grandchild both ignore SIGTERM; the leader is not our child (so its
    /// corpse stays a zombie until waited for, and counts as gone).
    #[tokio::test]
    async fn a_whole_group_that_is_not_our_child_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("grandchild");
        let script = format!(
            "trap '' TERM; sh -c 'trap \"\" TERM; echo $$ > {}; sleep 60' & sleep 60",
            f.display()
        );
        let mut leader = std::process::Command::new("sh")
            .args(["-c", &script])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = leader.id();
        let grandchild = ready(&f).await;
        assert!(alive(pid) && alive(grandchild));
        let t = Instant::now();
        stop_groups(&[pid], Duration::from_millis(300), alive).await;
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "killed before the grace"
        );
        let t = Instant::now();
        while (alive(pid) || alive(grandchild)) && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!alive(pid), "leader survived");
        assert!(!alive(grandchild), "grandchild survived");
        leader.wait().unwrap();
    }

    #[tokio::test]
    async fn stopping_a_group_whose_leader_honours_sigterm_ends_early() {
        let mut leader = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let t = Instant::now();
        stop_groups(&[leader.id()], Duration::from_secs(5), alive).await;
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(
            leader.wait().unwrap().signal(),
            Some(Signal::SIGTERM as i32)
        );
    }

    #[test]
    fn a_zombie_counts_as_gone_and_a_running_process_is_alive_as_itself() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let t = Instant::now();
        // Spawned, but maybe not yet exec'd.
        while cmdline(pid) != ["sleep", "30"] && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(alive(pid), "state {:?}", state(pid));
        assert!(alive_as(pid, |a| a.first().is_some_and(|p| p == "sleep")));
        assert!(!alive_as(pid, |a| a.iter().any(|a| a == "--master")));
        child.kill().unwrap();
        // Killed but not waited for: a zombie, which is gone.
        while state(pid) != Some('Z') && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(state(pid), Some('Z'));
        assert!(!alive(pid));
        child.wait().unwrap();
        assert_eq!(state(pid), None);
        assert!(!alive(pid));
        assert!(cmdline(pid).is_empty());
        assert!(!alive(u32::MAX));
    }
}
