//! What `/proc` says about a process: its state, command line and working directory. Tests
//! use it to check processes they did not start themselves (workers, agents restarted by
//! hand), where no `Child` handle can be waited on.
//!
//! A zombie counts as gone (`fleet_common::process::alive`, the one place that decides it):
//! its process has exited, and only its exit status waits for the parent (or init) to collect
//! it.

use std::fs;
use std::path::PathBuf;

pub use fleet_common::process::state;

/// The command line, arguments joined by spaces; empty if the process is gone.
pub fn cmdline(pid: u32) -> String {
    fleet_common::process::cmdline(pid).join(" ")
}

/// The working directory, if the process exists and may be inspected.
pub fn cwd(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// Running or sleeping: it exists and has not exited.
pub fn is_live(pid: u32) -> bool {
    fleet_common::process::alive(pid)
}

/// No such process, or only a zombie left.
pub fn is_gone(pid: u32) -> bool {
    !is_live(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    fn until(what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(5), "waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_child_is_live_until_it_exits_and_gone_as_a_zombie() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        // Spawned, but maybe not yet exec'd.
        until("the exec", || cmdline(pid) == "sleep 30");
        assert!(is_live(pid), "state {:?}", state(pid));
        assert!(!is_gone(pid));
        assert_eq!(cwd(pid), std::env::current_dir().ok());
        child.kill().unwrap();
        // Not waited for yet: a zombie, which is gone.
        until("a zombie", || state(pid) == Some('Z'));
        assert!(is_gone(pid));
        child.wait().unwrap();
        assert_eq!(state(pid), None);
        assert!(is_gone(pid));
        assert_eq!(cmdline(pid), "");
        assert_eq!(cwd(pid), None);
    }
}
