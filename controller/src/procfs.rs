//! Processes the controller finds again by pid (a Locust master it adopts, local agents): a
//! pid is only trusted while it is alive, not a zombie, and its command line says it is ours,
//! since pids are reused.

/// Whether `pid` is a live (not zombie) process whose arguments satisfy `ours`.
pub fn live_process(pid: u32, ours: impl Fn(&[&[u8]]) -> bool) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit(')')
        .next()
        .map(|r| r.trim_start().starts_with('Z'))
        .unwrap_or(true);
    let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
    !zombie && ours(&args)
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_is_live_and_a_dead_pid_is_not() {
        let me = std::process::id();
        assert!(super::live_process(me, |args| !args.is_empty()));
        assert!(!super::live_process(me, |_| false), "not ours");
        assert!(!super::live_process(u32::MAX, |_| true));
    }
}
