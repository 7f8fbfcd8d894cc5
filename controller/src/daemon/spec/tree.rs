//! What a version holds, read from its bundle bytes: the file tree, one file, and the unified
//! diff of two versions, file by file. Pure functions of the bytes (docs/protocol.md,
//! "Editing the spec").

use std::collections::BTreeMap;
use std::io::Read;

use flate2::read::GzDecoder;
use serde::Serialize;

/// One entry of a version's tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TreeEntry {
    /// Relative, `/`-separated; directories without a trailing slash.
    pub path: String,
    /// `file` or `dir`.
    pub kind: &'static str,
    /// Bytes (0 for a directory).
    pub size: u64,
    /// Packed with mode 0755.
    pub executable: bool,
    /// Valid UTF-8 (an editor can show it).
    pub text: bool,
}

/// How a file differs between two versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileDiff {
    pub path: String,
    /// `added`, `removed` or `modified`.
    pub change: &'static str,
    /// Not UTF-8 on one side: no line diff, only that it changed.
    pub binary: bool,
    /// A unified diff (`--- a/PATH`, `+++ b/PATH`, hunks with 3 lines of context).
    pub diff: String,
}

/// Files and directories of a bundle, by path: `None` for a directory, else the file's bytes
/// and whether it is executable.
type Contents = BTreeMap<String, Option<(Vec<u8>, bool)>>;

fn contents(bundle: &[u8]) -> Result<Contents, String> {
    let mut archive = tar::Archive::new(GzDecoder::new(bundle));
    let mut out = Contents::new();
    let bad = |e: std::io::Error| format!("bundle is not a valid gzipped tar: {e}");
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.display().to_string();
        let path = path.trim_end_matches('/').to_string();
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                out.insert(path, None);
            }
            tar::EntryType::Regular => {
                let exec = entry.header().mode().map_err(bad)? & 0o111 != 0;
                let mut data = Vec::new();
                entry.read_to_end(&mut data).map_err(bad)?;
                out.insert(path, Some((data, exec)));
            }
            // Packing writes nothing else: anything else is not one of our bundles.
            other => return Err(format!("bundle entry {path:?} has tar type {other:?}")),
        }
    }
    Ok(out)
}

/// The tree of a bundle, sorted by path.
pub fn tree(bundle: &[u8]) -> Result<Vec<TreeEntry>, String> {
    Ok(contents(bundle)?
        .into_iter()
        .map(|(path, c)| match c {
            None => TreeEntry {
                path,
                kind: "dir",
                size: 0,
                executable: false,
                text: false,
            },
            Some((data, exec)) => TreeEntry {
                path,
                kind: "file",
                size: data.len() as u64,
                executable: exec,
                text: std::str::from_utf8(&data).is_ok(),
            },
        })
        .collect())
}

/// One file of a bundle; `None` if there is no such file (or it is a directory).
pub fn file(bundle: &[u8], path: &str) -> Result<Option<Vec<u8>>, String> {
    let path = path.trim_start_matches("./");
    Ok(contents(bundle)?
        .remove(path)
        .flatten()
        .map(|(data, _)| data))
}

/// The files that differ from `from` to `to`, sorted by path, each with its unified diff.
/// Directories only show through their files; a mode change alone shows as a header line.
pub fn diff(from: &[u8], to: &[u8]) -> Result<Vec<FileDiff>, String> {
    let a = contents(from)?;
    let b = contents(to)?;
    let mut paths: Vec<&String> = a.keys().chain(b.keys()).collect();
    paths.sort();
    paths.dedup();
    let mut out = Vec::new();
    for path in paths {
        let old = a.get(path).cloned().flatten();
        let new = b.get(path).cloned().flatten();
        let change = match (&old, &new) {
            (None, None) => continue,
            (None, Some(_)) => "added",
            (Some(_), None) => "removed",
            (Some(x), Some(y)) if x == y => continue,
            (Some(_), Some(_)) => "modified",
        };
        out.push(file_diff(path, change, old.as_ref(), new.as_ref()));
    }
    Ok(out)
}

/// A side of a diff as text: empty when absent, `None` when not UTF-8.
fn text(f: Option<&(Vec<u8>, bool)>) -> Option<&str> {
    match f {
        None => Some(""),
        Some((d, _)) => std::str::from_utf8(d).ok(),
    }
}

fn file_diff(
    path: &str,
    change: &'static str,
    old: Option<&(Vec<u8>, bool)>,
    new: Option<&(Vec<u8>, bool)>,
) -> FileDiff {
    let (from_name, to_name) = (
        if old.is_some() {
            format!("a/{path}")
        } else {
            "/dev/null".to_string()
        },
        if new.is_some() {
            format!("b/{path}")
        } else {
            "/dev/null".to_string()
        },
    );
    let mut diff = String::new();
    if let (Some((_, x)), Some((_, y))) = (old, new) {
        if x != y {
            let mode = |e: &bool| if *e { "100755" } else { "100644" };
            diff.push_str(&format!("old mode {}\nnew mode {}\n", mode(x), mode(y)));
        }
    }
    match (text(old), text(new)) {
        (Some(x), Some(y)) => {
            let body = similar::TextDiff::from_lines(x, y)
                .unified_diff()
                .context_radius(3)
                .header(&from_name, &to_name)
                .to_string();
            diff.push_str(&body);
            FileDiff {
                path: path.to_string(),
                change,
                binary: false,
                diff,
            }
        }
        _ => {
            diff.push_str(&format!("Binary files {from_name} and {to_name} differ\n"));
            FileDiff {
                path: path.to_string(),
                change,
                binary: true,
                diff,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_common::bundle::{pack_dir, Limits};
    use std::path::Path;

    fn pack(files: &[(&str, &[u8])]) -> Vec<u8> {
        let d = tempfile::tempdir().unwrap();
        for (p, data) in files {
            let path = d.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        }
        pack_dir(d.path(), "locustfile.py", &Limits::default())
            .unwrap()
            .bytes
    }

    #[test]
    fn the_tree_lists_files_and_directories_with_sizes_and_text() {
        let b = pack(&[
            ("locustfile.py", b"import lib\n"),
            ("lib/__init__.py", b""),
            ("data/blob.bin", &[0xff, 0xfe, 0]),
        ]);
        let t = tree(&b).unwrap();
        let paths: Vec<(&str, &str)> = t.iter().map(|e| (e.path.as_str(), e.kind)).collect();
        assert_eq!(
            paths,
            vec![
                ("data", "dir"),
                ("data/blob.bin", "file"),
                ("lib", "dir"),
                ("lib/__init__.py", "file"),
                ("locustfile.py", "file"),
            ]
        );
        let lf = t.iter().find(|e| e.path == "locustfile.py").unwrap();
        assert_eq!((lf.size, lf.text), (11, true));
        assert!(!t.iter().find(|e| e.path == "data/blob.bin").unwrap().text);
    }

    #[test]
    fn one_file_is_read_by_its_path_and_directories_are_not_files() {
        let b = pack(&[("locustfile.py", b"x = 1\n"), ("lib/a.py", b"A\n")]);
        assert_eq!(file(&b, "lib/a.py").unwrap().unwrap(), b"A\n");
        assert_eq!(file(&b, "./locustfile.py").unwrap().unwrap(), b"x = 1\n");
        assert!(file(&b, "lib").unwrap().is_none());
        assert!(file(&b, "nope.py").unwrap().is_none());
        assert!(file(b"not a bundle", "x").is_err());
    }

    #[test]
    fn the_diff_shows_added_removed_and_modified_files_as_unified_hunks() {
        let a = pack(&[
            ("locustfile.py", b"one\ntwo\nthree\n"),
            ("old.py", b"gone\n"),
            ("same.py", b"same\n"),
        ]);
        let b = pack(&[
            ("locustfile.py", b"one\nTWO\nthree\n"),
            ("new.py", b"fresh\n"),
            ("same.py", b"same\n"),
        ]);
        let d = diff(&a, &b).unwrap();
        let summary: Vec<(&str, &str)> = d.iter().map(|f| (f.path.as_str(), f.change)).collect();
        assert_eq!(
            summary,
            vec![
                ("locustfile.py", "modified"),
                ("new.py", "added"),
                ("old.py", "removed"),
            ]
        );
        assert_eq!(
            d[0].diff,
            "--- a/locustfile.py\n+++ b/locustfile.py\n@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n"
        );
        assert!(
            d[1].diff.starts_with("--- /dev/null\n+++ b/new.py\n"),
            "{}",
            d[1].diff
        );
        assert!(d[2].diff.contains("-gone"), "{}", d[2].diff);
        assert!(diff(&a, &a).unwrap().is_empty());
    }

    #[test]
    fn binary_files_and_mode_changes_are_said_not_diffed() {
        let a = pack(&[("locustfile.py", b"x\n"), ("blob", &[0xff, 1])]);
        let b = pack(&[("locustfile.py", b"x\n"), ("blob", &[0xff, 2])]);
        let d = diff(&a, &b).unwrap();
        assert_eq!(d.len(), 1);
        assert!(d[0].binary);
        assert_eq!(d[0].diff, "Binary files a/blob and b/blob differ\n");

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("locustfile.py"), "x\n").unwrap();
        let plain = pack_dir(dir.path(), "locustfile.py", &Limits::default()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let p = Path::new(dir.path()).join("locustfile.py");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let exec = pack_dir(dir.path(), "locustfile.py", &Limits::default()).unwrap();
        let d = diff(&plain.bytes, &exec.bytes).unwrap();
        assert_eq!(d[0].diff, "old mode 100644\nnew mode 100755\n");
    }
}
