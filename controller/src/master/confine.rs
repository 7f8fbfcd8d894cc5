//! Keeps the spec's code out of the fleet's secrets: how the managed Locust master is confined.
//!
//! Whoever can publish a spec runs Python in the master, on the controller host. Three layers
//! keep that code from the fleet directory (`secrets/`, `certs/ca.key`, the tokens), the
//! controller user's `HOME` (AWS profiles, SSO caches) and the controller's environment
//! (docs/security.md, "The spec author's reach"):
//!
//! - the environment is cleared to an allowlist ([`fleet_common::child_env`]), with a scratch
//!   `HOME` and `TMPDIR` in the master's *workspace*, a directory of its own outside the fleet
//!   directory that also holds the copy of the spec it runs and its CSV files;
//! - when `fleet serve` runs as root, the master runs as `master.user` (`nobody` by default),
//!   so file modes keep it out of everything the controller made 0600 or 0700;
//! - Landlock (Linux 5.13+), for root and non-root alike: the master may read everything but
//!   the hidden paths (the fleet directory, the controller's `HOME`, AWS credential files),
//!   may write only in its workspace, `/dev/null` and `/dev/shm`, and may not signal or trace
//!   processes outside its sandbox (the controller among them).
//!
//! Landlock grants access to whole trees and cannot take back part of one, so "everything but
//! these paths" is built by walking down from `/` along each hidden path and granting every
//! entry beside it ([`readable`]). The Python that runs Locust may live under a hidden path (a
//! pyenv in the controller's `HOME`); its trees are granted back ([`runtime_roots`]).
//!
//! The rules are applied by `fleet master-exec`, which the supervisor starts in place of
//! `locust`: it opens the granted paths, drops to the master's user, restricts itself and
//! executes Locust, so the master's process (and its pid, which adoption relies on) is the one
//! the supervisor started. The decisions here are pure and take what they read as arguments.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::MasterError;

/// Variables that name AWS credential files: hidden like the controller's `HOME`.
const AWS_FILE_VARS: &[&str] = &[
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
];

/// Writable outside the workspace: what Python and Locust open for writing on their own.
const WRITABLE_DEVICES: &[&str] = &["/dev/null", "/dev/shm"];

/// How the master is started, decided at each start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// `master.confine = false`: only the environment is cleared.
    Off,
    /// Through `fleet master-exec` with this plan.
    Confined(Plan),
}

/// What `fleet master-exec` applies before it executes Locust.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Run as this uid and gid (only when `fleet serve` is root).
    pub user: Option<(u32, u32)>,
    /// Landlock: read and execute beneath these; `None` when the kernel has no Landlock (then
    /// `user` is set: the separate user alone).
    pub landlock: Option<Rules>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    pub read: Vec<PathBuf>,
    pub write: Vec<PathBuf>,
}

/// What the controller can do to confine the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Powers {
    pub root: bool,
    pub landlock: bool,
}

impl Powers {
    pub fn current() -> Powers {
        Powers {
            root: nix::unistd::geteuid().is_root(),
            landlock: landlock_available(),
        }
    }
}

/// How to confine, from the setting and what this host allows. Without root and without
/// Landlock nothing keeps the master out of files the controller can read: refused, unless
/// the operator turned confinement off.
pub fn decide(confine: bool, powers: Powers) -> Result<Decision, MasterError> {
    match (confine, powers.root, powers.landlock) {
        (false, _, _) => Ok(Decision::Off),
        (true, true, landlock) => Ok(Decision::User { landlock }),
        (true, false, true) => Ok(Decision::Landlock),
        (true, false, false) => Err(MasterError::Confine(
            "this kernel has no Landlock (Linux 5.13+) and `fleet serve` is not root, so a spec \
             could read the fleet's secrets; run on a kernel with Landlock, run `fleet serve` as \
             root (the master then runs as master.user), or set master.confine = false in \
             fleet.toml to accept it"
                .into(),
        )),
    }
}

/// How to confine and as whom: [`decide`], then the master user's ids when the controller is
/// root (looked up on each start, so a user created later is found).
pub fn who(
    confine: bool,
    user: &str,
    powers: Powers,
) -> Result<(Decision, Option<(u32, u32)>), MasterError> {
    let decision = decide(confine, powers)?;
    let ids = match decision {
        Decision::User { .. } => Some(lookup_user(user)?),
        _ => None,
    };
    Ok((decision, ids))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Off,
    /// Root: a separate user, and Landlock when the kernel has it.
    User {
        landlock: bool,
    },
    Landlock,
}

fn landlock_available() -> bool {
    use landlock::{Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, ABI};
    Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(ABI::V1))
        .and_then(|r| r.create())
        .is_ok()
}

/// The paths the master must not see: the fleet directory, the controller user's `HOME` and
/// AWS credential files named in the environment. `/` itself is never hidden.
pub fn hidden(fleet_dir: &Path, var: impl Fn(&str) -> Option<OsString>) -> Vec<PathBuf> {
    let mut out = vec![fleet_dir.to_path_buf()];
    out.extend(var("HOME").map(PathBuf::from));
    out.extend(
        AWS_FILE_VARS
            .iter()
            .filter_map(|v| var(v).map(PathBuf::from)),
    );
    let mut seen = BTreeSet::new();
    out.into_iter()
        .filter(|p| p.is_absolute())
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        .filter(|p| p != Path::new("/") && seen.insert(p.clone()))
        .collect()
}

/// A directory's entries, each with its real path (`None` for a dangling link).
pub type Lister = dyn Fn(&Path) -> Vec<(PathBuf, Option<PathBuf>)>;

/// Everything but the hidden paths: walking down from `/` along each hidden path, every entry
/// beside it. `list` gives a directory's entries with their real paths (`None` for a dangling
/// link). An entry whose real path is hidden, or leads to one, is not granted through its name.
pub fn readable(hidden: &[PathBuf], list: &Lister) -> Vec<PathBuf> {
    fn walk(dir: &Path, hidden: &[PathBuf], list: &Lister, out: &mut Vec<PathBuf>) {
        for (entry, real) in list(dir) {
            let Some(real) = real else { continue };
            let inside = hidden.iter().any(|h| real.starts_with(h));
            let leads = hidden.iter().any(|h| h.starts_with(&real));
            if leads && !inside && entry == real {
                walk(&real, hidden, list, out);
            } else if !inside && !leads {
                out.push(real);
            }
        }
    }
    let mut out = vec![];
    walk(Path::new("/"), hidden, list, &mut out);
    out
}

/// A directory's entries and their real paths, for [`readable`].
pub fn list_dir(dir: &Path) -> Vec<(PathBuf, Option<PathBuf>)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    rd.flatten()
        .map(|e| {
            let p = e.path();
            let real = std::fs::canonicalize(&p).ok();
            (p, real)
        })
        .collect()
}

/// `locust` as the child will find it: a path, or a name looked up in `path_var`.
pub fn which(program: &str, path_var: Option<&OsString>) -> Option<PathBuf> {
    let is_exe = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_exe(&p).then_some(p);
    }
    std::env::split_paths(path_var?)
        .map(|d| d.join(program))
        .find(|p| is_exe(p))
}

/// The trees Locust's Python needs: the virtualenv `locust` sits in and the prefix of the
/// interpreter its `#!` line names (both as real paths). `read_head` gives a file's first bytes.
pub fn runtime_roots(locust: &Path, read_head: impl Fn(&Path) -> Option<Vec<u8>>) -> Vec<PathBuf> {
    let prefix = |exe: &Path| -> Option<PathBuf> {
        let real = std::fs::canonicalize(exe).ok()?;
        Some(real.parent()?.parent()?.to_path_buf())
    };
    let mut out: Vec<PathBuf> = prefix(locust).into_iter().collect();
    let head = read_head(locust).unwrap_or_default();
    if let Some(line) = head.strip_prefix(b"#!") {
        let line = line.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        if let Some(interp) = line.split_whitespace().next() {
            out.extend(prefix(Path::new(interp)));
        }
    }
    out.retain(|p| p != Path::new("/"));
    out.dedup();
    out
}

/// File facts for [`unreachable_for`].
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// The first directory on the way to `path`, or `path` itself, that `uid`/`gid` (no
/// supplementary groups) cannot search or read: what makes a start as `master.user` fail.
pub fn unreachable_for(
    uid: u32,
    gid: u32,
    path: &Path,
    meta: impl Fn(&Path) -> Option<Meta>,
) -> Option<PathBuf> {
    let allows = |m: Meta, bit: u32| {
        let shift = if m.uid == uid {
            6
        } else if m.gid == gid {
            3
        } else {
            0
        };
        (m.mode >> shift) & bit != 0
    };
    let ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
    for dir in ancestors.into_iter().rev() {
        match meta(dir) {
            Some(m) if allows(m, 0o1) => {}
            _ => return Some(dir.to_path_buf()),
        }
    }
    match meta(path) {
        Some(m) if allows(m, 0o4) => None,
        _ => Some(path.to_path_buf()),
    }
}

pub fn meta(p: &Path) -> Option<Meta> {
    std::fs::metadata(p).ok().map(|m| Meta {
        uid: m.uid(),
        gid: m.gid(),
        mode: m.mode(),
    })
}

/// A confined process's own directory, outside the fleet directory: the master's (spec copies,
/// scratch `HOME` and `TMPDIR`, CSV files) or the validation gate's (the spec being checked and
/// a scratch `HOME`).
#[derive(Debug, Clone)]
pub struct Workspace {
    pub root: PathBuf,
}

/// A start's paths in the workspace.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub spec: PathBuf,
    pub home: PathBuf,
    pub tmp: PathBuf,
    pub csv: PathBuf,
}

impl Workspace {
    /// The master's: one per fleet directory, in the system's temporary directory.
    pub fn for_fleet(fleet_dir: &Path) -> Workspace {
        Workspace::named("master", fleet_dir)
    }

    /// `<tmp>/fleet-<kind>-<id>`, one per fleet directory: outside it, so a separate user can
    /// reach it whatever the fleet directory's mode, and Landlock can hide the whole fleet
    /// directory.
    pub fn named(kind: &str, fleet_dir: &Path) -> Workspace {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(fleet_dir.as_os_str().as_encoded_bytes());
        let id: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
        Workspace {
            root: std::env::temp_dir().join(format!("fleet-{kind}-{id}")),
        }
    }

    /// Makes the directory if it is missing (readable by all, whatever the umask); it must be
    /// ours and writable by no one else, or someone else could change what a confined process
    /// runs.
    pub fn claim(&self) -> Result<(), MasterError> {
        let root = &self.root;
        match std::fs::DirBuilder::new().mode(0o755).create(root) {
            Ok(()) => std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| cannot_prepare(root, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(cannot_prepare(root, e)),
        }
        let m = std::fs::symlink_metadata(root).map_err(|e| cannot_prepare(root, e))?;
        if !m.is_dir() || m.uid() != nix::unistd::geteuid().as_raw() || m.mode() & 0o022 != 0 {
            return Err(MasterError::Confine(format!(
                "{} is not the controller's own directory (a link, another owner, or writable by others); remove it",
                root.display()
            )));
        }
        Ok(())
    }

    /// Empty directories `names` in the workspace, 0700 and given to `owner` (the confined
    /// process's user, when it has one): whatever an earlier run left there is gone.
    pub fn scratch<const N: usize>(
        &self,
        names: [&str; N],
        owner: Option<(u32, u32)>,
    ) -> Result<[PathBuf; N], MasterError> {
        let mut out = Vec::with_capacity(N);
        for d in names {
            let p = self.root.join(d);
            let _ = std::fs::remove_dir_all(&p);
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&p)
                .map_err(|e| cannot_prepare(&p, e))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                    .map_err(|e| cannot_prepare(&p, e))?;
            }
            out.push(p);
        }
        Ok(out.try_into().expect("N names, N paths"))
    }

    /// Makes the workspace for a start on `spec` (a verified copy of the spec): [`claim`]ed;
    /// the spec is copied in readable by all, and the scratch directories are emptied and given
    /// to `owner`. Only called when no master runs.
    ///
    /// [`claim`]: Workspace::claim
    pub fn prepare(&self, spec: &Path, owner: Option<(u32, u32)>) -> Result<Prepared, MasterError> {
        self.claim()?;
        let name = spec.file_name().unwrap_or_default();
        let specs = self.root.join("spec");
        let copy = specs.join(name);
        // Copies of earlier specs go: no master runs on them any more.
        if let Ok(rd) = std::fs::read_dir(&specs) {
            for e in rd.flatten().filter(|e| e.file_name() != name) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        if !copy.is_dir() {
            let tmp = specs.join(".copy");
            let _ = std::fs::remove_dir_all(&tmp);
            copy_tree(spec, &tmp).map_err(|e| cannot_prepare(&tmp, e))?;
            open_dirs(&specs).map_err(|e| cannot_prepare(&specs, e))?;
            std::fs::rename(&tmp, &copy).map_err(|e| cannot_prepare(&copy, e))?;
        }
        let [home, tmp, csv] = self.scratch(["home", "tmp", "csv"], owner)?;
        Ok(Prepared {
            spec: copy,
            home,
            tmp,
            csv: csv.join("run"),
        })
    }
}

fn cannot_prepare(p: &Path, e: std::io::Error) -> MasterError {
    MasterError::Confine(format!("cannot prepare {}: {e}", p.display()))
}

/// Makes `dir` and every directory beneath it 0755: a tree made under a tight umask (the
/// systemd unit's 0077) must still be readable by the master's user.
pub fn open_dirs(dir: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            open_dirs(&e.path())?;
        }
    }
    Ok(())
}

/// Copies a spec tree (directories and regular files only; it is an unpacked bundle).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let ty = e.file_type()?;
        let dest = to.join(e.file_name());
        if ty.is_dir() {
            copy_tree(&e.path(), &dest)?;
        } else if ty.is_file() {
            std::fs::copy(e.path(), &dest)?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o644))?;
        }
    }
    Ok(())
}

/// Everything a start needs to build its [`Mode`].
pub struct Inputs<'a> {
    pub decision: Decision,
    pub user: &'a str,
    pub fleet_dir: &'a Path,
    pub locust: &'a Path,
    pub workspace: &'a Workspace,
}

/// The master user's uid and gid; root is refused (that is `master.confine = false`).
pub fn lookup_user(name: &str) -> Result<(u32, u32), MasterError> {
    let u = nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .ok_or_else(|| {
            MasterError::Confine(format!(
                "master.user {name:?} does not exist; create it (useradd --system {name}) or set master.user in fleet.toml"
            ))
        })?;
    if u.uid.is_root() {
        return Err(MasterError::Confine(format!(
            "master.user {name:?} is root; name an unprivileged user in fleet.toml"
        )));
    }
    Ok((u.uid.as_raw(), u.gid.as_raw()))
}

/// The plan for one start. `user` is the master's uid/gid when root.
pub fn plan(inp: &Inputs<'_>, user: Option<(u32, u32)>) -> Result<Mode, MasterError> {
    let landlock = match inp.decision {
        Decision::Off => return Ok(Mode::Off),
        Decision::User { landlock } => landlock,
        Decision::Landlock => true,
    };
    let roots = runtime_roots(inp.locust, |p| {
        use std::io::Read;
        let mut buf = vec![0; 256];
        let n = std::fs::File::open(p)
            .and_then(|mut f| f.read(&mut buf))
            .ok()?;
        buf.truncate(n);
        Some(buf)
    });
    if let Some((uid, gid)) = user {
        let mut need = vec![inp.locust.to_path_buf(), inp.workspace.root.clone()];
        need.extend(roots.iter().cloned());
        for p in need {
            if let Some(blocked) = unreachable_for(uid, gid, &p, meta) {
                return Err(MasterError::Confine(format!(
                    "master.user {:?} cannot reach {} ({} is closed to it); install Locust where that user can read it (e.g. /opt/fleet/venv) or set master.user",
                    inp.user,
                    p.display(),
                    blocked.display()
                )));
            }
        }
    }
    if !landlock {
        return Ok(Mode::Confined(Plan {
            user,
            landlock: None,
        }));
    }
    let hidden = hidden(inp.fleet_dir, |v| std::env::var_os(v));
    if let Some(r) = roots
        .iter()
        .find(|r| hidden.iter().any(|h| h.starts_with(r) && h != *r))
    {
        return Err(MasterError::Confine(format!(
            "the Python that runs Locust ({}) holds a directory the master must not read; install Locust elsewhere (e.g. /opt/fleet/venv)",
            r.display()
        )));
    }
    let mut read = readable(&hidden, &list_dir);
    read.extend(roots);
    let mut write = vec![inp.workspace.root.clone()];
    write.extend(
        WRITABLE_DEVICES
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.exists()),
    );
    Ok(Mode::Confined(Plan {
        user,
        landlock: Some(Rules { read, write }),
    }))
}

/// The program and first arguments that run `program` under `mode`: `program` itself when
/// confinement is off, else `fleet master-exec --plan <json> -- program`, which becomes
/// `program` (same pid) once the plan is applied. `fleet` is this binary.
pub fn launcher(mode: &Mode, fleet: &Path, program: &Path) -> (PathBuf, Vec<OsString>) {
    match mode {
        Mode::Off => (program.to_path_buf(), vec![]),
        Mode::Confined(plan) => (
            fleet.to_path_buf(),
            vec![
                "master-exec".into(),
                "--plan".into(),
                serde_json::to_string(plan).expect("serialises").into(),
                "--".into(),
                program.into(),
            ],
        ),
    }
}

/// A command that runs `program` under `mode` ([`launcher`]); the caller adds the program's
/// arguments, its environment and its standard streams.
pub fn command(mode: &Mode, program: &Path) -> Result<tokio::process::Command, MasterError> {
    let fleet = match mode {
        Mode::Off => PathBuf::new(),
        Mode::Confined(_) => std::env::current_exe()
            .map_err(|e| MasterError::Confine(format!("cannot find the fleet binary: {e}")))?,
    };
    let (exe, args) = launcher(mode, &fleet, program);
    let mut c = tokio::process::Command::new(exe);
    c.args(args);
    Ok(c)
}

/// `fleet master-exec`: applies `plan` to this process and executes `argv`. Returns only on
/// failure.
pub fn exec(plan: &Plan, argv: &[OsString]) -> anyhow::Error {
    use landlock::{
        path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, Scope, ABI,
    };
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = argv.split_first() else {
        return anyhow::anyhow!("fleet master-exec: no command given");
    };
    // The rules are opened while the paths can still be reached (before the user changes).
    let ruleset = match &plan.landlock {
        None => None,
        Some(r) => {
            let abi = ABI::V5;
            let built = Ruleset::default()
                .set_compatibility(CompatLevel::BestEffort)
                .handle_access(AccessFs::from_all(abi))
                .and_then(|s| s.scope(Scope::from_all(ABI::V6)))
                .and_then(|s| s.create())
                .and_then(|s| s.add_rules(path_beneath_rules(&r.read, AccessFs::from_read(abi))))
                .and_then(|s| s.add_rules(path_beneath_rules(&r.write, AccessFs::from_all(abi))));
            match built {
                Ok(s) => Some(s),
                Err(e) => return anyhow::anyhow!("fleet master-exec: Landlock rules: {e}"),
            }
        }
    };
    if let Some((uid, gid)) = plan.user {
        let gid = nix::unistd::Gid::from_raw(gid);
        let r = nix::unistd::setgroups(&[gid])
            .and_then(|()| nix::unistd::setgid(gid))
            .and_then(|()| nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)));
        if let Err(e) = r {
            return anyhow::anyhow!("fleet master-exec: cannot become uid {uid}: {e}");
        }
    }
    if let Some(s) = ruleset {
        match s.restrict_self() {
            Ok(st) if st.ruleset != RulesetStatus::NotEnforced && st.no_new_privs => {}
            Ok(st) => return anyhow::anyhow!("fleet master-exec: Landlock not enforced ({st:?})"),
            Err(e) => return anyhow::anyhow!("fleet master-exec: Landlock: {e}"),
        }
    }
    let e = std::process::Command::new(program).args(args).exec();
    anyhow::anyhow!(
        "fleet master-exec: cannot run {}: {e}",
        program.to_string_lossy()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    /// A small file system: `/` holds `etc`, `usr`, `tmp`, `root`, and `lib -> usr/lib`;
    /// `/tmp` holds the fleet directory, another directory and a link to the fleet directory.
    fn tree(dir: &Path) -> Vec<(PathBuf, Option<PathBuf>)> {
        let same = |s: &str| (p(s), Some(p(s)));
        match dir.to_str().unwrap() {
            "/" => vec![
                same("/etc"),
                same("/usr"),
                same("/tmp"),
                same("/root"),
                (p("/lib"), Some(p("/usr/lib"))),
                (p("/dangling"), None),
            ],
            "/tmp" => vec![
                same("/tmp/fleet"),
                same("/tmp/other"),
                (p("/tmp/sneaky"), Some(p("/tmp/fleet/secrets"))),
                (p("/tmp/up"), Some(p("/tmp"))),
            ],
            d => panic!("{d} is not on the way to a hidden path"),
        }
    }

    #[test]
    fn everything_but_the_hidden_paths_is_readable_and_links_do_not_lead_back_in() {
        let hidden = [p("/tmp/fleet"), p("/root")];
        let got = readable(&hidden, &tree);
        assert_eq!(got, [p("/etc"), p("/usr"), p("/tmp/other"), p("/usr/lib")]);
    }

    #[test]
    fn the_hidden_paths_are_the_fleet_dir_home_and_aws_files_never_the_root() {
        let env = |v: &str| match v {
            "HOME" => Some(OsString::from("/nonexistent-home")),
            "AWS_SHARED_CREDENTIALS_FILE" => Some(OsString::from("/creds/x")),
            "AWS_CONFIG_FILE" => Some(OsString::from("relative/ignored")),
            _ => None,
        };
        assert_eq!(
            hidden(Path::new("/nonexistent-fleet"), env),
            [
                p("/nonexistent-fleet"),
                p("/nonexistent-home"),
                p("/creds/x")
            ]
        );
        let root_home = |v: &str| (v == "HOME").then(|| OsString::from("/"));
        assert_eq!(hidden(Path::new("/f"), root_home), [p("/f")]);
    }

    #[test]
    fn without_root_or_landlock_confinement_is_refused_unless_turned_off() {
        let p = |root, landlock| Powers { root, landlock };
        assert_eq!(decide(true, p(false, true)).unwrap(), Decision::Landlock);
        assert_eq!(
            decide(true, p(true, false)).unwrap(),
            Decision::User { landlock: false }
        );
        assert_eq!(
            decide(true, p(true, true)).unwrap(),
            Decision::User { landlock: true }
        );
        assert_eq!(decide(false, p(false, false)).unwrap(), Decision::Off);
        let e = decide(true, p(false, false)).unwrap_err().to_string();
        assert!(e.contains("master.confine = false"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn a_closed_directory_on_the_way_is_named() {
        let m = |uid, gid, mode| Some(Meta { uid, gid, mode });
        let fs = |p: &Path| match p.to_str().unwrap() {
            "/" => m(0, 0, 0o755),
            "/root" => m(0, 0, 0o700),
            "/root/py" => m(0, 0, 0o755),
            "/opt" => m(0, 0, 0o755),
            "/opt/grp" => m(0, 50, 0o750),
            "/opt/grp/locust" => m(0, 50, 0o750),
            "/opt/locust" => m(0, 0, 0o755),
            _ => None,
        };
        assert_eq!(
            unreachable_for(65534, 65534, Path::new("/root/py"), fs),
            Some(p("/root"))
        );
        assert_eq!(
            unreachable_for(65534, 65534, Path::new("/opt/locust"), fs),
            None
        );
        assert_eq!(unreachable_for(0, 0, Path::new("/root/py"), fs), None);
        assert_eq!(
            unreachable_for(1000, 50, Path::new("/opt/grp/locust"), fs),
            None
        );
        assert_eq!(
            unreachable_for(1000, 51, Path::new("/opt/grp/locust"), fs),
            Some(p("/opt/grp"))
        );
        assert_eq!(
            unreachable_for(1000, 51, Path::new("/opt/missing"), fs),
            Some(p("/opt/missing"))
        );
    }

    #[test]
    fn the_runtime_is_the_venv_and_the_interpreter_prefix() {
        let d = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(d.path()).unwrap();
        for sub in ["venv/bin", "py/bin"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(d.join("py/bin/python3"), "").unwrap();
        std::os::unix::fs::symlink(d.join("py/bin/python3"), d.join("venv/bin/python")).unwrap();
        let locust = d.join("venv/bin/locust");
        std::fs::write(&locust, "").unwrap();
        let head = format!("#!{} -u\nimport x\n", d.join("venv/bin/python").display());
        let roots = runtime_roots(&locust, |_| Some(head.clone().into_bytes()));
        assert_eq!(roots, [d.join("venv"), d.join("py")]);
        assert_eq!(runtime_roots(&locust, |_| None), [d.join("venv")]);
    }

    #[test]
    fn a_confined_program_starts_through_master_exec_with_its_plan() {
        let locust = Path::new("/opt/venv/bin/locust");
        let fleet = Path::new("/usr/bin/fleet");
        assert_eq!(
            launcher(&Mode::Off, fleet, locust),
            (locust.to_path_buf(), vec![])
        );
        let plan = Plan {
            user: Some((65534, 65534)),
            landlock: Some(Rules {
                read: vec![p("/usr")],
                write: vec![p("/tmp/fleet-gate-x")],
            }),
        };
        let (exe, args) = launcher(&Mode::Confined(plan.clone()), fleet, locust);
        assert_eq!(exe, fleet);
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(args[..2], ["master-exec", "--plan"]);
        assert_eq!(args[3..], ["--", "/opt/venv/bin/locust"]);
        let sent: Plan = serde_json::from_str(args[2]).unwrap();
        assert_eq!(sent, plan);
    }

    #[test]
    fn each_confined_process_has_its_workspace_outside_the_fleet_directory() {
        let fleet = Path::new("/srv/fleet");
        let master = Workspace::for_fleet(fleet).root;
        let gate = Workspace::named("gate", fleet).root;
        assert_ne!(master, gate);
        assert!(gate.starts_with(std::env::temp_dir()), "{}", gate.display());
        assert!(!gate.starts_with(fleet));
        let name = gate.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("fleet-gate-") && name.len() == 27,
            "{name}"
        );
        assert_eq!(gate, Workspace::named("gate", fleet).root, "stable");
        assert_ne!(gate, Workspace::named("gate", Path::new("/srv/other")).root);
    }

    #[test]
    fn scratch_directories_start_empty_and_closed_and_open_dirs_opens_a_tree() {
        let d = tempfile::tempdir().unwrap();
        let ws = Workspace {
            root: d.path().join("ws"),
        };
        ws.claim().unwrap();
        let [home] = ws.scratch(["home"], None).unwrap();
        std::fs::write(home.join("left"), "").unwrap();
        let [home] = ws.scratch(["home"], None).unwrap();
        assert!(!home.join("left").exists());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&home), 0o700);
        assert_eq!(mode(&ws.root), 0o755);
        let tree = d.path().join("t");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(tree.join("a/b"))
            .unwrap();
        open_dirs(&tree).unwrap();
        assert_eq!(mode(&tree.join("a/b")), 0o755);
    }

    #[test]
    fn a_workspace_not_ours_is_refused_and_a_start_gets_a_fresh_scratch() {
        let d = tempfile::tempdir().unwrap();
        let spec = d.path().join("abc");
        std::fs::create_dir_all(spec.join("lib")).unwrap();
        std::fs::write(spec.join("locustfile.py"), "x").unwrap();
        std::fs::write(spec.join("lib/a.py"), "y").unwrap();
        let ws = Workspace {
            root: d.path().join("ws"),
        };
        let got = ws.prepare(&spec, None).unwrap();
        assert_eq!(
            std::fs::read_to_string(got.spec.join("lib/a.py")).unwrap(),
            "y"
        );
        std::fs::write(got.home.join("left"), "").unwrap();
        let again = ws.prepare(&spec, None).unwrap();
        assert!(!again.home.join("left").exists(), "HOME starts empty");
        assert_eq!(again.csv, ws.root.join("csv/run"));
        std::fs::set_permissions(&ws.root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ws.prepare(&spec, None).unwrap_err().to_string();
        assert!(e.contains("remove it"), "{e}");
    }
}
