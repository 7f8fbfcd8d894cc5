//! A change of the spec through the API: which version it is based on ([`check_base`]), which
//! paths may be written ([`spec_path`]), and how the spec directory is brought to a checked
//! tree ([`mirror`]). The Steward carries changes out one at a time (docs/protocol.md,
//! "Editing the spec").

use std::fs;
use std::io;
use std::path::{Component, Path};

use fleet_common::bundle::is_ignored;
use fleet_common::wire::SpecVersion;

/// What an API request asks of the spec.
#[derive(Debug, Clone)]
pub enum Edit {
    /// A whole spec, as a bundle (gzipped tar, the agents' format).
    Replace(Vec<u8>),
    /// Write one file (created with its directories if new).
    Put { path: String, data: Vec<u8> },
    /// Remove one file.
    Delete { path: String },
    /// The content of a published sequence, published again as a new one.
    Rollback(u64),
}

impl Edit {
    /// The version's origin, as the history shows it.
    pub fn origin(&self) -> String {
        match self {
            Edit::Replace(_) => "push".into(),
            Edit::Put { path, .. } => format!("edit {path}"),
            Edit::Delete { path } => format!("delete {path}"),
            Edit::Rollback(seq) => format!("rollback to {seq}"),
        }
    }
}

/// Why a change is refused because the spec moved on since its base version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub message: String,
}

/// Whether a change based on sequence `base` may go ahead, given the history (newest first).
///
/// "Based on" compares content, not numbers: the change goes ahead while the current
/// publication carries the same bundle as `base`. A new sequence that only restarted the master
/// or counted past an agent does not refuse anyone; an edit published in between does. `base`
/// 0 means "nothing published yet".
pub fn check_base(base: u64, history: &[SpecVersion]) -> Result<(), Conflict> {
    let Some(current) = history.first() else {
        return if base == 0 {
            Ok(())
        } else {
            Err(Conflict {
                message: format!(
                    "nothing is published yet, so version {base} does not exist; push with base 0"
                ),
            })
        };
    };
    let conflict = |message: String| Err(Conflict { message });
    if base == current.sequence {
        return Ok(());
    }
    if base > current.sequence {
        return conflict(format!(
            "version {base} does not exist (the current version is {}); pull and try again",
            current.sequence
        ));
    }
    match history.iter().find(|v| v.sequence == base) {
        Some(b) if b.sha256 == current.sha256 => Ok(()),
        Some(b) => {
            // The first version after `base` with other content: the change that came between.
            let by = history
                .iter()
                .rev()
                .find(|v| v.sequence > base && v.sha256 != b.sha256)
                .map(|v| format!(" (version {}: {})", v.sequence, v.origin))
                .unwrap_or_default();
            conflict(format!(
                "the spec changed since version {base}{by}; pull version {}, apply your change \
                 again and retry",
                current.sequence
            ))
        }
        None => conflict(format!(
            "version {base} is older than the history the controller keeps (current {}); pull \
             the current version, apply your change again and retry",
            current.sequence
        )),
    }
}

/// A path a file may be written at or removed from: relative, `/`-separated, inside the spec,
/// and not a name packing leaves out (it would never be published).
pub fn spec_path(raw: &str) -> Result<String, String> {
    let mut parts = Vec::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(p) => {
                let p = p.to_str().ok_or("file names must be UTF-8")?;
                if is_ignored(p) {
                    return Err(format!(
                        "{raw:?}: {p:?} is a name the spec leaves out (hidden, __pycache__, \
                         *.pyc or a backup~); choose another name"
                    ));
                }
                parts.push(p);
            }
            Component::CurDir => {}
            _ => {
                return Err(format!(
                    "{raw:?} is not a relative path inside the spec; give one like lib/tasks.py"
                ))
            }
        }
    }
    if parts.is_empty() {
        return Err("no file path given; give one like lib/tasks.py".into());
    }
    Ok(parts.join("/"))
}

/// Makes the spec directory `to` hold what `from` holds, file by file: each new or changed
/// file is written beside its place under a hidden name (which packing ignores) and renamed
/// over it, so no reader ever sees half a file; files and directories `from` lacks are removed.
/// Hidden names and the other entries packing ignores are left alone. Returns how many entries
/// were written or removed (0: the directory already held it, and nothing was touched).
pub(crate) fn mirror(from: &Path, to: &Path) -> io::Result<usize> {
    let mut changed = 0;
    copy_into(from, to, &mut changed)?;
    prune(from, to, &mut changed)?;
    Ok(changed)
}

fn copy_into(from: &Path, to: &Path, changed: &mut usize) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut entries: Vec<_> = fs::read_dir(from)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if is_ignored(&name.to_string_lossy()) {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        let meta = fs::symlink_metadata(&src)?;
        let there = fs::symlink_metadata(&dst).ok();
        if meta.is_dir() {
            if there.as_ref().is_some_and(|t| !t.is_dir()) {
                fs::remove_file(&dst)?;
            }
            if !dst.is_dir() {
                fs::create_dir(&dst)?;
                *changed += 1;
            }
            copy_into(&src, &dst, changed)?;
            continue;
        }
        let data = fs::read(&src)?;
        let mode = if meta.permissions().mode() & 0o111 != 0 {
            0o755
        } else {
            0o644
        };
        if let Some(t) = &there {
            if t.is_dir() {
                fs::remove_dir_all(&dst)?;
            } else if t.is_file()
                && (t.permissions().mode() & 0o111 != 0) == (mode == 0o755)
                && fs::read(&dst)? == data
            {
                continue;
            }
        }
        let tmp = to.join(format!(".fleet-write-{}", name.to_string_lossy()));
        fs::write(&tmp, &data)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, &dst)?;
        *changed += 1;
    }
    Ok(())
}

fn prune(from: &Path, to: &Path, changed: &mut usize) -> io::Result<()> {
    for e in fs::read_dir(to)? {
        let e = e?;
        let name = e.file_name();
        if is_ignored(&name.to_string_lossy()) {
            continue;
        }
        let (src, dst) = (from.join(&name), e.path());
        let here = fs::symlink_metadata(&dst)?;
        match fs::symlink_metadata(&src) {
            Ok(m) if m.is_dir() && here.is_dir() => prune(&src, &dst, changed)?,
            Ok(_) => {}
            Err(_) if here.is_dir() => {
                fs::remove_dir_all(&dst)?;
                *changed += 1;
            }
            Err(_) => {
                fs::remove_file(&dst)?;
                *changed += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(sequence: u64, sha: &str, origin: &str) -> SpecVersion {
        SpecVersion {
            sequence,
            sha256: sha.into(),
            size: 1,
            master_epoch: 1,
            created: "2025-01-01T00:00:00Z".into(),
            origin: origin.into(),
        }
    }

    #[test]
    fn a_change_based_on_the_current_version_goes_ahead() {
        let h = [v(3, "bb", "push"), v(2, "aa", "directory")];
        assert_eq!(check_base(3, &h), Ok(()));
        assert_eq!(
            check_base(0, &[]),
            Ok(()),
            "the first push of an empty controller"
        );
    }

    #[test]
    fn a_change_based_on_an_older_content_is_refused_and_says_what_came_between() {
        let h = [v(3, "bb", "edit locustfile.py"), v(2, "aa", "directory")];
        let e = check_base(2, &h).unwrap_err().message;
        assert!(e.contains("changed since version 2"), "{e}");
        assert!(e.contains("(version 3: edit locustfile.py)"), "{e}");
        assert!(e.contains("pull version 3"), "{e}");
    }

    #[test]
    fn republishing_the_same_content_does_not_refuse_changes_based_on_it() {
        // 3 and 4 only restarted the master and counted past an agent: same bundle as 2.
        let h = [
            v(4, "aa", "count past 3"),
            v(3, "aa", "master restart"),
            v(2, "aa", "push"),
        ];
        assert_eq!(check_base(2, &h), Ok(()));
        assert_eq!(check_base(3, &h), Ok(()));
    }

    #[test]
    fn unknown_or_future_bases_are_refused() {
        let h = [v(9, "bb", "push"), v(8, "aa", "push")];
        assert!(check_base(10, &h)
            .unwrap_err()
            .message
            .contains("does not exist"));
        assert!(check_base(2, &h)
            .unwrap_err()
            .message
            .contains("older than the history"));
        assert!(check_base(1, &[]).unwrap_err().message.contains("base 0"));
    }

    #[test]
    fn only_relative_visible_paths_inside_the_spec_may_be_written() {
        assert_eq!(spec_path("lib/tasks.py").unwrap(), "lib/tasks.py");
        assert_eq!(spec_path("./locustfile.py").unwrap(), "locustfile.py");
        for bad in [
            "/etc/passwd",
            "../x.py",
            "lib/../../x",
            "",
            ".env",
            "lib/__pycache__/x",
            "a.pyc",
            "x~",
        ] {
            assert!(spec_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn mirroring_writes_changes_removes_what_is_gone_and_leaves_hidden_files() {
        use std::os::unix::fs::PermissionsExt;
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let (f, t) = (from.path(), to.path());
        fs::create_dir_all(f.join("lib")).unwrap();
        fs::write(f.join("locustfile.py"), "new\n").unwrap();
        fs::write(f.join("lib/a.py"), "a\n").unwrap();
        fs::write(f.join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(f.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir_all(t.join("old/deep")).unwrap();
        fs::write(t.join("old/deep/x.py"), "x").unwrap();
        fs::write(t.join("locustfile.py"), "old\n").unwrap();
        fs::write(t.join("gone.py"), "bye").unwrap();
        fs::write(t.join(".git-keep"), "mine").unwrap();
        fs::write(t.join("lib"), "a file where a directory comes").unwrap();

        assert!(mirror(f, t).unwrap() > 0);
        assert_eq!(
            fs::read_to_string(t.join("locustfile.py")).unwrap(),
            "new\n"
        );
        assert_eq!(fs::read_to_string(t.join("lib/a.py")).unwrap(), "a\n");
        assert!(!t.join("gone.py").exists());
        assert!(!t.join("old").exists());
        assert_eq!(fs::read_to_string(t.join(".git-keep")).unwrap(), "mine");
        let mode = fs::metadata(t.join("run.sh")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        let names: Vec<String> = fs::read_dir(t)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with(".fleet-write")),
            "no temporary left: {names:?}"
        );
        assert_eq!(mirror(f, t).unwrap(), 0, "a second mirror touches nothing");
    }
}
