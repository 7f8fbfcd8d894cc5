//! The validation gate: before a spec is published, load it the way a worker will, with the
//! pinned `locust -f <unpacked copy>/<locustfile> --list`, in a scratch directory, under a
//! timeout and with a cleared environment. A spec whose Python does not compile, whose imports
//! do not resolve against that Locust, that defines no User class, or that hangs at import is
//! refused; the agents keep the bundle they run (docs/configuration.md, `[spec]`).
//!
//! Loading the spec runs its code on the controller host, so the gate is confined exactly like
//! the managed master (`master::confine`, docs/security.md, "The spec author's reach"): the
//! same `master.user` and `master.confine`, Landlock through `fleet master-exec`, and a
//! workspace of its own outside the fleet directory (`<tmp>/fleet-gate-<id>`). Where the master
//! could not be confined, neither can the gate: it then refuses every spec.
//!
//! [`judge`] turns what Locust did into a [`Verdict`] and [`confinement`] says how the gate is
//! confined; both are pure. [`Gate::check`] only prepares and runs the process and hands its
//! output over.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fleet_common::bundle::{self, Limits, Packed};
use fleet_common::process::{signal_group, Signal};
use tokio::io::AsyncReadExt;

use crate::master::confine::{self, Decision, Powers, Workspace};
use crate::master::MasterError;

/// Lines of Locust's output a refusal keeps: the end of a traceback.
const KEEP_LINES: usize = 12;
/// Most bytes read from each of Locust's streams (a spec that prints in a loop at import).
const MAX_OUTPUT: u64 = 256 << 10;
/// The marker before the user classes in `locust --list`'s output.
const LIST_HEADER: &str = "Available Users:";

/// How one run of `locust --list` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    /// Killed by a signal (not ours).
    Signal,
    /// Still running at the timeout; its process group was killed.
    TimedOut(Duration),
}

/// What the gate says about a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Loads, with these user classes.
    Passed { users: Vec<String> },
    /// Must not be published: `reason` is one line, `output` the last lines of Locust's output.
    Refused { reason: String, output: Vec<String> },
}

/// The verdict on one run. `scratch` is where the spec was unpacked: it is cut from the output
/// so that paths read as the spec's own (`locustfile.py`, `lib/x.py`).
pub fn judge(exit: &Exit, stdout: &str, stderr: &str, scratch: &str) -> Verdict {
    let clean = |s: &str| {
        if scratch.is_empty() {
            s.to_string()
        } else {
            s.replace(&format!("{scratch}/"), "")
        }
    };
    let tail = |s: &str| -> Vec<String> {
        let lines: Vec<String> = s
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| clean(l.trim_end()))
            .collect();
        lines[lines.len().saturating_sub(KEEP_LINES)..].to_vec()
    };
    match exit {
        Exit::TimedOut(t) => Verdict::Refused {
            reason: format!(
                "loading the spec did not finish within {} s (does it block or loop at import?)",
                t.as_secs_f64()
            ),
            output: tail(stderr),
        },
        Exit::Signal => Verdict::Refused {
            reason: "loading the spec killed Locust (a signal)".into(),
            output: tail(stderr),
        },
        Exit::Code(0) => {
            let users = listed_users(stdout);
            if users.is_empty() {
                Verdict::Refused {
                    reason: "the spec defines no User class (none that is not abstract); \
                             add a class that derives from locust's User, HttpUser or \
                             FastHttpUser"
                        .into(),
                    output: tail(stdout),
                }
            } else {
                Verdict::Passed { users }
            }
        }
        Exit::Code(code) => {
            let output = tail(stderr);
            Verdict::Refused {
                reason: failure_line(&output, *code),
                output,
            }
        }
    }
}

/// The user classes `locust --list` printed: the indented names after its header.
fn listed_users(stdout: &str) -> Vec<String> {
    let Some((_, after)) = stdout.split_once(LIST_HEADER) else {
        return vec![];
    };
    after
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with(' ') || l.starts_with('\t'))
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// One line for a failed load: the exception (a traceback's last line) and where it was
/// raised in the spec, if the traceback names a spec file.
fn failure_line(output: &[String], code: i32) -> String {
    let Some(last) = output.last() else {
        return format!("locust --list exited {code} and printed nothing");
    };
    // The innermost frame in the spec: not Python's nor Locust's own files.
    let place = output
        .iter()
        .rev()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix("File \"")?;
            let (file, tail) = rest.split_once('"')?;
            let line = tail.trim_start_matches(", line ").split(',').next()?.trim();
            let own = !file.starts_with('/') && !file.starts_with('<');
            own.then(|| format!("{file}:{line}"))
        })
        .next();
    match place {
        Some(p) => format!("{} (at {p})", last.trim()),
        None => last.trim().to_string(),
    }
}

/// How the gate is confined, as `/api/spec` tells it, from `master.confine`, `master.user` and
/// what this host allows ([`confine::decide`]); `Err` is the line every check is refused with.
pub fn confinement(confine: bool, user: &str, powers: Powers) -> Result<String, String> {
    match confine::decide(confine, powers) {
        Ok(Decision::Off) => Ok("unconfined: master.confine = false".into()),
        Ok(Decision::User { landlock: true }) => Ok(format!("as {user}, under Landlock")),
        Ok(Decision::User { landlock: false }) => Ok(format!("as {user}")),
        Ok(Decision::Landlock) => Ok("under Landlock".into()),
        Err(e) => Err(refusal(e)),
    }
}

/// A confinement error as the gate reports it: about the gate, not the master.
fn refusal(e: MasterError) -> String {
    match e {
        MasterError::Confine(why) => format!("cannot confine the validation gate: {why}"),
        other => other.to_string(),
    }
}

/// The gate's settings.
#[derive(Debug, Clone)]
pub struct Gate {
    /// The `locust` to run; `None` turns the gate off (see [`Gate::describe`]).
    pub locust: Option<String>,
    /// Why it is off, when it is.
    pub off_reason: String,
    pub timeout: Duration,
    /// Where specs are unpacked and loaded (emptied after each check): outside the fleet
    /// directory.
    pub workspace: Workspace,
    /// The master's confinement settings (`master.confine`, `master.user`), which the gate
    /// shares.
    pub confine: bool,
    pub user: String,
    /// What Landlock hides from the gate, with the controller's `HOME`.
    pub fleet_dir: PathBuf,
}

/// A check ready to run: the command (confined), the unpacked spec and the scratch `HOME`.
struct Prepared {
    cmd: tokio::process::Command,
    exe: PathBuf,
    spec: PathBuf,
    home: PathBuf,
}

impl Gate {
    /// How `/api/spec` describes the gate.
    pub fn describe(&self) -> String {
        let Some(l) = &self.locust else {
            return format!("off ({})", self.off_reason);
        };
        match confinement(self.confine, &self.user, Powers::current()) {
            Ok(how) => format!(
                "{l} -f <spec> --list (timeout {} s, {how})",
                self.timeout.as_secs_f64()
            ),
            Err(why) => format!("refusing every spec: {why}"),
        }
    }

    pub fn enabled(&self) -> bool {
        self.locust.is_some()
    }

    /// Unpacks `packed` into the gate's workspace and loads it with Locust, confined.
    pub async fn check(&self, packed: &Packed, locustfile: &str, limits: &Limits) -> Verdict {
        let Some(locust) = &self.locust else {
            return Verdict::Passed { users: vec![] };
        };
        let verdict = match self.prepare(locust, packed, limits) {
            Err(reason) => Verdict::Refused {
                reason,
                output: vec![],
            },
            Ok(p) => {
                let v = match run_list(p.cmd, &p.exe, &p.spec, locustfile, &p.home, self.timeout)
                    .await
                {
                    Ok((exit, out, err)) => judge(&exit, &out, &err, &p.spec.display().to_string()),
                    Err(e) => Verdict::Refused {
                        reason: cannot_run(locust, &e),
                        output: vec![],
                    },
                };
                self.empty();
                v
            }
        };
        verdict
    }

    /// Empties the workspace after a check (only ever called once it was claimed).
    fn empty(&self) {
        for d in ["spec", "home"] {
            let _ = std::fs::remove_dir_all(self.workspace.root.join(d));
        }
    }

    /// Everything a check needs before Locust starts: where it runs, as whom, under which
    /// rules. `Err` is the refusal's reason.
    fn prepare(&self, locust: &str, packed: &Packed, limits: &Limits) -> Result<Prepared, String> {
        let exe = confine::which(locust, std::env::var_os("PATH").as_ref()).ok_or_else(|| {
            cannot_run(locust, &std::io::Error::from(std::io::ErrorKind::NotFound))
        })?;
        let (decision, user) =
            confine::who(self.confine, &self.user, Powers::current()).map_err(refusal)?;
        self.workspace.claim().map_err(refusal)?;
        // Past the claim the workspace is ours, and emptied whatever happens next.
        let ready = self.ready(exe, decision, user, packed, limits);
        if ready.is_err() {
            self.empty();
        }
        ready
    }

    /// Unpacks the spec into the claimed workspace, makes the scratch `HOME` and the command.
    fn ready(
        &self,
        exe: PathBuf,
        decision: Decision,
        user: Option<(u32, u32)>,
        packed: &Packed,
        limits: &Limits,
    ) -> Result<Prepared, String> {
        let spec = self.workspace.root.join("spec");
        let _ = std::fs::remove_dir_all(&spec);
        bundle::unpack(&packed.bytes, &spec, limits)
            .map_err(|e| e.to_string())
            .and_then(|_| confine::open_dirs(&spec).map_err(|e| e.to_string()))
            .map_err(|e| format!("cannot unpack the spec to check it: {e}"))?;
        let [home] = self.workspace.scratch(["home"], user).map_err(refusal)?;
        let inputs = confine::Inputs {
            decision,
            user: &self.user,
            fleet_dir: &self.fleet_dir,
            locust: &exe,
            workspace: &self.workspace,
        };
        let mode = confine::plan(&inputs, user).map_err(refusal)?;
        let cmd = confine::command(&mode, &exe).map_err(refusal)?;
        Ok(Prepared {
            cmd,
            exe,
            spec,
            home,
        })
    }
}

fn cannot_run(locust: &str, e: &std::io::Error) -> String {
    format!(
        "cannot run the validation gate ({locust}: {e}); set spec.locust in fleet.toml, or \
         spec.validate = false"
    )
}

/// The environment Locust loads the spec in: nothing of the controller's own, so a spec that
/// loads here does not depend on it. `PATH` has the directory of `locust` first (its Python
/// when it is a virtualenv's script), then the system's.
fn cleared_env(locust: &str, home: &Path) -> Vec<(String, String)> {
    let mut path = String::new();
    if let Some(dir) = Path::new(locust).parent().filter(|d| d.is_absolute()) {
        path.push_str(&dir.display().to_string());
        path.push(':');
    }
    path.push_str("/usr/local/bin:/usr/bin:/bin");
    let home = home.display().to_string();
    vec![
        ("PATH".into(), path),
        ("LANG".into(), "C.UTF-8".into()),
        ("HOME".into(), home.clone()),
        ("TMPDIR".into(), home),
        ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
        ("PYTHONUNBUFFERED".into(), "1".into()),
    ]
}

/// Runs `locust -f spec/locustfile --list` in `spec` (as a worker runs there) through `cmd`
/// (`locust`, or `fleet master-exec` that becomes it) in a process group of its own, killed
/// whole at the timeout.
async fn run_list(
    mut cmd: tokio::process::Command,
    locust: &Path,
    spec: &Path,
    locustfile: &str,
    home: &Path,
    timeout: Duration,
) -> std::io::Result<(Exit, String, String)> {
    let mut child = cmd
        .arg("-f")
        .arg(spec.join(locustfile))
        .arg("--list")
        .current_dir(spec)
        .env_clear()
        .envs(cleared_env(&locust.to_string_lossy(), home))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id();
    let mut out = child.stdout.take().expect("piped").take(MAX_OUTPUT);
    let mut err = child.stderr.take().expect("piped").take(MAX_OUTPUT);
    let read_all = async {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let _ = tokio::join!(out.read_to_end(&mut o), err.read_to_end(&mut e));
        let status = child.wait().await;
        (status, o, e)
    };
    let (exit, o, e) = match tokio::time::timeout(timeout, read_all).await {
        Ok((status, o, e)) => {
            let status = status?;
            let exit = status.code().map(Exit::Code).unwrap_or(Exit::Signal);
            (exit, o, e)
        }
        Err(_) => {
            if let Some(pid) = pid {
                signal_group(pid, Signal::SIGKILL);
            }
            (Exit::TimedOut(timeout), vec![], vec![])
        }
    };
    Ok((
        exit,
        String::from_utf8_lossy(&o).into_owned(),
        String::from_utf8_lossy(&e).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRATCH: &str = "/tmp/fleet-gate-0123456789abcdef/spec";

    #[test]
    fn a_spec_that_lists_users_passes_with_them() {
        let out = "Available Users:\n    Web\n    Api\n";
        assert_eq!(
            judge(
                &Exit::Code(0),
                out,
                "[..] INFO/locust.main: Starting Locust 2.47.0\n",
                SCRATCH
            ),
            Verdict::Passed {
                users: vec!["Web".into(), "Api".into()]
            }
        );
    }

    #[test]
    fn a_spec_with_no_user_class_is_refused_though_locust_exits_0() {
        let Verdict::Refused { reason, .. } =
            judge(&Exit::Code(0), "Available Users:\n", "", SCRATCH)
        else {
            panic!("passed");
        };
        assert!(reason.contains("no User class"), "{reason}");
        assert!(matches!(
            judge(&Exit::Code(0), "", "", SCRATCH),
            Verdict::Refused { .. }
        ));
    }

    #[test]
    fn an_import_error_names_the_exception_and_the_spec_line() {
        let err = format!(
            "Traceback (most recent call last):\n  File \"/venv/lib/python3.11/site-packages/locust/util/load_locustfile.py\", line 71, in load_locustfile\n    loader.exec_module(imported)\n  File \"<frozen importlib._bootstrap>\", line 241, in _call_with_frames_removed\n  File \"{SCRATCH}/lib/helpers.py\", line 3, in <module>\n    import nosuchmod\nModuleNotFoundError: No module named 'nosuchmod'\n"
        );
        let Verdict::Refused { reason, output } = judge(&Exit::Code(1), "", &err, SCRATCH) else {
            panic!("passed");
        };
        assert_eq!(
            reason,
            "ModuleNotFoundError: No module named 'nosuchmod' (at lib/helpers.py:3)"
        );
        assert!(
            output.iter().all(|l| !l.contains(SCRATCH)),
            "scratch paths are cut: {output:?}"
        );
        assert_eq!(
            output.last().unwrap(),
            "ModuleNotFoundError: No module named 'nosuchmod'"
        );
    }

    #[test]
    fn a_syntax_error_names_its_line_and_keeps_the_caret() {
        let err = format!(
            "Traceback (most recent call last):\n  File \"<frozen importlib._bootstrap>\", line 241, in _call\n  File \"{SCRATCH}/locustfile.py\", line 7\n    def x(:\n          ^\nSyntaxError: invalid syntax\n"
        );
        let Verdict::Refused { reason, output } = judge(&Exit::Code(1), "", &err, SCRATCH) else {
            panic!("passed");
        };
        assert_eq!(reason, "SyntaxError: invalid syntax (at locustfile.py:7)");
        assert!(output.contains(&"          ^".to_string()), "{output:?}");
    }

    #[test]
    fn long_output_keeps_its_last_lines_and_empty_output_still_says_something() {
        let err: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let Verdict::Refused { reason, output } = judge(&Exit::Code(2), "", &err, "") else {
            panic!("passed");
        };
        assert_eq!(output.len(), KEEP_LINES);
        assert_eq!(reason, "line 99");
        let Verdict::Refused { reason, .. } = judge(&Exit::Code(3), "", "", "") else {
            panic!("passed");
        };
        assert_eq!(reason, "locust --list exited 3 and printed nothing");
    }

    #[test]
    fn a_timeout_says_the_spec_may_block_at_import() {
        let Verdict::Refused { reason, .. } =
            judge(&Exit::TimedOut(Duration::from_secs(20)), "", "", SCRATCH)
        else {
            panic!("passed");
        };
        assert!(reason.contains("within 20 s"), "{reason}");
    }

    #[test]
    fn the_gate_is_confined_as_the_master_or_refuses_every_spec() {
        let p = |root, landlock| Powers { root, landlock };
        let c = |confine, powers| confinement(confine, "fleet-locust", powers);
        assert_eq!(
            c(true, p(true, true)).unwrap(),
            "as fleet-locust, under Landlock"
        );
        assert_eq!(c(true, p(true, false)).unwrap(), "as fleet-locust");
        assert_eq!(c(true, p(false, true)).unwrap(), "under Landlock");
        assert_eq!(
            c(false, p(false, false)).unwrap(),
            "unconfined: master.confine = false"
        );
        let e = c(true, p(false, false)).unwrap_err();
        assert!(
            e.starts_with("cannot confine the validation gate: ")
                && e.contains("master.confine = false")
                && !e.contains('\n'),
            "{e}"
        );
    }

    /// A gate whose `locust` is a script that lists one user class when it runs in the gate's
    /// workspace on the unpacked spec (and fails elsewhere), with
    /// confinement off (a confined check runs `fleet master-exec`, which the e2e tests cover).
    fn fake_gate(dir: &Path) -> Gate {
        use std::os::unix::fs::PermissionsExt;
        let dir = &std::fs::canonicalize(dir).unwrap();
        let locust = dir.join("locust");
        std::fs::write(
            &locust,
            format!(
                "#!/bin/sh\n[ \"$PWD\" = {ws}/spec ] && [ -f \"$2\" ] || {{ echo \"not in {ws}/spec: $PWD $2\" >&2; exit 3; }}\nprintf 'Available Users:\\n    Web\\n'\n",
                ws = dir.join("ws").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&locust, std::fs::Permissions::from_mode(0o755)).unwrap();
        Gate {
            locust: Some(locust.display().to_string()),
            off_reason: String::new(),
            timeout: Duration::from_secs(10),
            workspace: Workspace {
                root: dir.join("ws"),
            },
            confine: false,
            user: "nobody".into(),
            fleet_dir: dir.join("fleet"),
        }
    }

    fn packed(dir: &Path) -> Packed {
        let spec = dir.join("spec-src");
        std::fs::create_dir_all(&spec).unwrap();
        std::fs::write(spec.join("locustfile.py"), "x = 1\n").unwrap();
        bundle::pack_dir(&spec, "locustfile.py", &Limits::default()).unwrap()
    }

    #[tokio::test]
    async fn a_check_runs_in_the_gates_workspace_and_leaves_it_empty() {
        let d = tempfile::tempdir().unwrap();
        let gate = fake_gate(d.path());
        let v = gate
            .check(&packed(d.path()), "locustfile.py", &Limits::default())
            .await;
        assert_eq!(
            v,
            Verdict::Passed {
                users: vec!["Web".into()]
            }
        );
        let left: Vec<_> = std::fs::read_dir(&gate.workspace.root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn a_workspace_others_can_write_is_refused_before_the_spec_runs() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let gate = fake_gate(d.path());
        std::fs::create_dir_all(gate.workspace.root.join("spec")).unwrap();
        std::fs::write(gate.workspace.root.join("spec/theirs"), "").unwrap();
        std::fs::set_permissions(&gate.workspace.root, std::fs::Permissions::from_mode(0o777))
            .unwrap();
        let Verdict::Refused { reason, .. } = gate
            .check(&packed(d.path()), "locustfile.py", &Limits::default())
            .await
        else {
            panic!("passed");
        };
        assert!(
            reason.starts_with("cannot confine the validation gate: ")
                && reason.ends_with("remove it"),
            "{reason}"
        );
        assert!(
            gate.workspace.root.join("spec/theirs").exists(),
            "nothing is removed from a workspace that is not ours"
        );
    }

    #[test]
    fn the_environment_is_cleared_to_path_lang_and_home() {
        let env = cleared_env("/opt/venv/bin/locust", Path::new("/scratch/home"));
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(
            get("PATH"),
            Some("/opt/venv/bin:/usr/local/bin:/usr/bin:/bin")
        );
        assert_eq!(get("HOME"), Some("/scratch/home"));
        assert_eq!(get("LANG"), Some("C.UTF-8"));
        assert!(get("AWS_PROFILE").is_none());
        let bare = cleared_env("locust", Path::new("/h"));
        assert_eq!(
            bare.iter().find(|(n, _)| n == "PATH").unwrap().1,
            "/usr/local/bin:/usr/bin:/bin"
        );
    }
}
