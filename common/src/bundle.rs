//! The bundle: a spec directory packed deterministically as a gzipped tar.
//!
//! Packing sorts paths, writes only regular files and directories, and normalises every header
//! (mode 0644/0755, uid/gid 0, no user or group names, mtime 0) so the same tree always gives
//! the same bytes, whatever order the file system lists it in. The bundle's id is the sha256 of
//! those bytes.
//!
//! Unpacking is the agent's side of the contract and refuses anything that could write outside
//! the destination or smuggle in something that is not a plain file: absolute paths, `..`,
//! symbolic and hard links, devices and FIFOs, and archives over the size or entry caps. Sizes
//! are each entry's real one (a PAX `size` record wins over the header's field), summed without
//! wrapping, and every file must hold exactly what it declares.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use flate2::{read::GzDecoder, Compression, GzBuilder};
use sha2::{Digest, Sha256};

/// Caps applied when packing and unpacking. The defaults suit locustfiles with modules and
/// modest data files; an operator with large CSV fixtures raises them in `fleet.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest packed (compressed) bundle, in bytes.
    pub max_packed: u64,
    /// Largest sum of file sizes once unpacked, in bytes.
    pub max_unpacked: u64,
    /// Most entries (files plus directories).
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packed: 64 << 20,
            max_unpacked: 256 << 20,
            max_entries: 10_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("bundle entry {0:?} has an absolute path")]
    Absolute(String),
    #[error("bundle entry {0:?} escapes the unpack directory")]
    Escapes(String),
    #[error("bundle entry {0:?} is a link; only regular files and directories are allowed")]
    Link(String),
    #[error("bundle entry {0:?} is a device, FIFO or socket; only regular files and directories are allowed")]
    Special(String),
    #[error("bundle is too large: {what} exceeds the cap of {limit} bytes")]
    TooLarge { what: &'static str, limit: u64 },
    #[error("bundle has more than {0} entries")]
    TooManyEntries(usize),
    #[error("bundle entry {entry:?} ends after {got} of its {declared} bytes")]
    Truncated {
        entry: String,
        declared: u64,
        got: u64,
    },
    #[error("bundle entry {0:?} appears twice")]
    Duplicate(String),
    #[error("spec directory has no {0}")]
    MissingEntryPoint(String),
    #[error("bundle is not a valid gzipped tar: {0}")]
    Corrupt(String),
}

/// Paths and the tar reader's messages hold entry names as the archive has them: every error
/// keeps them on one line.
fn one_line(s: &str) -> String {
    crate::wire::one_line(s, crate::wire::limits::MAX_ERROR)
}

fn io_err(path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> BundleError {
    let path = one_line(&path.as_ref().display().to_string());
    move |source| BundleError::Io { path, source }
}

/// A packed bundle and its id.
#[derive(Debug, Clone)]
pub struct Packed {
    pub bytes: Vec<u8>,
    pub sha256: String,
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Whether a bundle id looks like a sha256 (64 lower-case hex digits). Routes and unpack
/// directories are named by it, so nothing else may pass.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Files the packer leaves out: editor droppings, VCS and tool directories (anything starting
/// with a dot), Python byte-code caches, and backup files ending in `~`.
pub fn is_ignored(name: &str) -> bool {
    name.starts_with('.') || name == "__pycache__" || name.ends_with(".pyc") || name.ends_with('~')
}

enum Kind {
    Dir,
    File { exec: bool },
}

struct Entry {
    rel: String,
    abs: PathBuf,
    kind: Kind,
}

fn collect(
    root: &Path,
    rel: &str,
    out: &mut Vec<Entry>,
    limits: &Limits,
) -> Result<(), BundleError> {
    let dir = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    for item in fs::read_dir(&dir).map_err(io_err(&dir))? {
        let item = item.map_err(io_err(&dir))?;
        let name = item.file_name();
        let Some(name) = name.to_str() else {
            return Err(BundleError::Corrupt(format!(
                "{}: file names must be UTF-8",
                item.path().display()
            )));
        };
        if is_ignored(name) {
            continue;
        }
        let child_rel = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let meta = fs::symlink_metadata(item.path()).map_err(io_err(item.path()))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            return Err(BundleError::Link(child_rel));
        }
        if out.len() >= limits.max_entries {
            return Err(BundleError::TooManyEntries(limits.max_entries));
        }
        if ft.is_dir() {
            out.push(Entry {
                rel: child_rel.clone(),
                abs: item.path(),
                kind: Kind::Dir,
            });
            collect(root, &child_rel, out, limits)?;
        } else if ft.is_file() {
            use std::os::unix::fs::PermissionsExt;
            let exec = meta.permissions().mode() & 0o111 != 0;
            out.push(Entry {
                rel: child_rel,
                abs: item.path(),
                kind: Kind::File { exec },
            });
        } else {
            return Err(BundleError::Special(child_rel));
        }
    }
    Ok(())
}

/// Packs `dir` deterministically. `entry_point` (normally `locustfile.py`) must exist in it.
pub fn pack_dir(dir: &Path, entry_point: &str, limits: &Limits) -> Result<Packed, BundleError> {
    let mut entries = Vec::new();
    collect(dir, "", &mut entries, limits)?;
    entries.sort_by(|a, b| a.rel.as_bytes().cmp(b.rel.as_bytes()));
    if !entries
        .iter()
        .any(|e| e.rel == entry_point && matches!(e.kind, Kind::File { .. }))
    {
        return Err(BundleError::MissingEntryPoint(entry_point.to_string()));
    }

    let gz = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::new(6));
    let mut tar = tar::Builder::new(gz);
    let mut total: u64 = 0;
    for e in &entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match e.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                tar.append_data(&mut h, format!("{}/", e.rel), io::empty())
                    .map_err(io_err(&e.abs))?;
            }
            Kind::File { exec } => {
                let data = fs::read(&e.abs).map_err(io_err(&e.abs))?;
                total += data.len() as u64;
                if total > limits.max_unpacked {
                    return Err(BundleError::TooLarge {
                        what: "unpacked size",
                        limit: limits.max_unpacked,
                    });
                }
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(if exec { 0o755 } else { 0o644 });
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, &e.rel, data.as_slice())
                    .map_err(io_err(&e.abs))?;
            }
        }
    }
    let gz = tar.into_inner().map_err(io_err(dir))?;
    let bytes = gz.finish().map_err(io_err(dir))?;
    if bytes.len() as u64 > limits.max_packed {
        return Err(BundleError::TooLarge {
            what: "packed size",
            limit: limits.max_packed,
        });
    }
    let sha256 = sha256_hex(&bytes);
    Ok(Packed { bytes, sha256 })
}

/// Checks one archive path and turns it into a relative path under the destination.
fn safe_relative(raw: &Path) -> Result<PathBuf, BundleError> {
    let shown = raw.display().to_string();
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err(BundleError::Escapes(shown)),
            Component::RootDir | Component::Prefix(_) => return Err(BundleError::Absolute(shown)),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(BundleError::Escapes(shown));
    }
    Ok(out)
}

/// What an unpack wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unpacked {
    pub files: usize,
    pub dirs: usize,
    pub bytes: u64,
}

/// Unpacks `bytes` into `dest`, which must not exist yet. On any refusal nothing is left
/// behind: the archive is written into a sibling temporary directory that is renamed into place
/// only once every entry has passed.
pub fn unpack(bytes: &[u8], dest: &Path, limits: &Limits) -> Result<Unpacked, BundleError> {
    if bytes.len() as u64 > limits.max_packed {
        return Err(BundleError::TooLarge {
            what: "packed size",
            limit: limits.max_packed,
        });
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = parent.join(format!(
        ".unpack-{}-{}",
        dest.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("bundle"),
        std::process::id()
    ));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    match unpack_into(bytes, &tmp, limits) {
        Ok(stats) => {
            fs::rename(&tmp, dest).map_err(io_err(dest))?;
            Ok(stats)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn unpack_into(bytes: &[u8], dest: &Path, limits: &Limits) -> Result<Unpacked, BundleError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let corrupt = |e: io::Error| BundleError::Corrupt(one_line(&e.to_string()));
    let mut archive = tar::Archive::new(GzDecoder::new(bytes));
    let mut stats = Unpacked::default();
    let mut seen = std::collections::HashSet::new();
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let raw = entry.path().map_err(corrupt)?.into_owned();
        let shown = raw.display().to_string();
        if stats.files + stats.dirs >= limits.max_entries {
            return Err(BundleError::TooManyEntries(limits.max_entries));
        }
        let ty = entry.header().entry_type();
        match ty {
            tar::EntryType::Symlink | tar::EntryType::Link => return Err(BundleError::Link(shown)),
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                return Err(BundleError::Special(shown))
            }
            tar::EntryType::Regular | tar::EntryType::Directory => {}
            other => {
                return Err(BundleError::Special(format!(
                    "{shown} (tar type {other:?})"
                )))
            }
        }
        let rel = safe_relative(&raw)?;
        if !seen.insert(rel.clone()) {
            return Err(BundleError::Duplicate(shown));
        }
        let target = dest.join(&rel);
        if ty == tar::EntryType::Directory {
            fs::create_dir_all(&target).map_err(io_err(&target))?;
            stats.dirs += 1;
            continue;
        }
        // The entry's real size: a PAX `size` record overrides the header's field, and the tar
        // reader yields exactly that many bytes. Checked against what is left of the cap, so
        // no header value can wrap the sum.
        let declared = entry.size();
        let budget = limits.max_unpacked.saturating_sub(stats.bytes);
        if declared > budget {
            return Err(BundleError::TooLarge {
                what: "unpacked size",
                limit: limits.max_unpacked,
            });
        }
        if let Some(p) = target.parent() {
            fs::create_dir_all(p).map_err(io_err(p))?;
        }
        let exec = entry.header().mode().map_err(corrupt)? & 0o111 != 0;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if exec { 0o755 } else { 0o644 })
            .open(&target)
            .map_err(io_err(&target))?;
        // Never more than the budget, whatever the reader does; then exactly the declared size.
        let mut limited = (&mut entry).take(budget);
        let got = io::copy(&mut limited, &mut f).map_err(io_err(&target))?;
        if got != declared {
            return Err(BundleError::Truncated {
                entry: shown,
                declared,
                got,
            });
        }
        f.flush().map_err(io_err(&target))?;
        f.set_permissions(fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }))
            .map_err(io_err(&target))?;
        stats.bytes += got;
        stats.files += 1;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) {
        fs::create_dir_all(dir.join("lib/data")).unwrap();
        fs::write(dir.join("locustfile.py"), "from locust import User\n").unwrap();
        fs::write(dir.join("lib/helpers.py"), "X = 1\n").unwrap();
        fs::write(dir.join("lib/data/users.csv"), "a,b\n1,2\n").unwrap();
    }

    #[test]
    fn packing_is_byte_identical_across_runs_and_creation_orders() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        spec(a.path());
        // Same content, created in another order, other mtimes and modes.
        fs::create_dir_all(b.path().join("lib/data")).unwrap();
        fs::write(b.path().join("lib/data/users.csv"), "a,b\n1,2\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(b.path().join("lib/helpers.py"), "X = 1\n").unwrap();
        fs::write(b.path().join("locustfile.py"), "from locust import User\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(
            b.path().join("lib/helpers.py"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        // Ignored droppings must not change the bytes either.
        fs::create_dir_all(b.path().join("__pycache__")).unwrap();
        fs::write(b.path().join("__pycache__/x.pyc"), "junk").unwrap();
        fs::write(b.path().join(".locustfile.py.swp"), "junk").unwrap();

        let l = Limits::default();
        let p1 = pack_dir(a.path(), "locustfile.py", &l).unwrap();
        let p2 = pack_dir(a.path(), "locustfile.py", &l).unwrap();
        let p3 = pack_dir(b.path(), "locustfile.py", &l).unwrap();
        assert_eq!(p1.bytes, p2.bytes);
        assert_eq!(p1.bytes, p3.bytes);
        assert_eq!(p1.sha256, sha256_hex(&p3.bytes));

        fs::write(b.path().join("lib/helpers.py"), "X = 2\n").unwrap();
        let p4 = pack_dir(b.path(), "locustfile.py", &l).unwrap();
        assert_ne!(p1.sha256, p4.sha256);
    }

    #[test]
    fn round_trip_restores_files_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let src = tempfile::tempdir().unwrap();
        spec(src.path());
        fs::write(src.path().join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(src.path().join("run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
        let p = pack_dir(src.path(), "locustfile.py", &Limits::default()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("b");
        let stats = unpack(&p.bytes, &dest, &Limits::default()).unwrap();
        assert_eq!(stats.files, 4);
        assert_eq!(
            fs::read_to_string(dest.join("lib/data/users.csv")).unwrap(),
            "a,b\n1,2\n"
        );
        let mode = |p: &str| fs::metadata(dest.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("run.sh"), 0o755);
        assert_eq!(mode("locustfile.py"), 0o644);
    }

    #[test]
    fn packing_refuses_symlinks_and_missing_locustfile() {
        let d = tempfile::tempdir().unwrap();
        spec(d.path());
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("pw")).unwrap();
        assert!(matches!(
            pack_dir(d.path(), "locustfile.py", &Limits::default()),
            Err(BundleError::Link(p)) if p == "pw"
        ));
        let e = tempfile::tempdir().unwrap();
        fs::write(e.path().join("other.py"), "").unwrap();
        assert!(matches!(
            pack_dir(e.path(), "locustfile.py", &Limits::default()),
            Err(BundleError::MissingEntryPoint(_))
        ));
    }

    /// Builds a gzipped tar by hand, writing raw names so that hostile paths get through.
    pub(crate) fn hostile(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let gz = GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (name, ty, data) in entries {
            let mut h = tar::Header::new_old();
            {
                let raw = h.as_old_mut();
                raw.name[..name.len()].copy_from_slice(name.as_bytes());
                if *ty == tar::EntryType::Symlink || *ty == tar::EntryType::Link {
                    raw.linkname[..11].copy_from_slice(b"/etc/passwd");
                }
            }
            h.set_entry_type(*ty);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn unpack_refuses_hostile_entries_and_leaves_nothing_behind() {
        use tar::EntryType as T;
        type Case = (Vec<u8>, fn(&BundleError) -> bool);
        let cases: Vec<Case> = vec![
            (hostile(&[("/etc/evil", T::Regular, b"x")]), |e| {
                matches!(e, BundleError::Absolute(_))
            }),
            (hostile(&[("a/../../evil", T::Regular, b"x")]), |e| {
                matches!(e, BundleError::Escapes(_))
            }),
            (hostile(&[("link", T::Symlink, b"")]), |e| {
                matches!(e, BundleError::Link(_))
            }),
            (hostile(&[("hard", T::Link, b"")]), |e| {
                matches!(e, BundleError::Link(_))
            }),
            (hostile(&[("dev", T::Char, b"")]), |e| {
                matches!(e, BundleError::Special(_))
            }),
            (hostile(&[("blk", T::Block, b"")]), |e| {
                matches!(e, BundleError::Special(_))
            }),
            (hostile(&[("fifo", T::Fifo, b"")]), |e| {
                matches!(e, BundleError::Special(_))
            }),
            (
                hostile(&[("ok.py", T::Regular, b"x"), ("ok.py", T::Regular, b"y")]),
                |e| matches!(e, BundleError::Duplicate(_)),
            ),
            (b"not a tarball at all".to_vec(), |e| {
                matches!(e, BundleError::Corrupt(_))
            }),
        ];
        for (i, (bytes, is_expected)) in cases.into_iter().enumerate() {
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("b");
            let err = unpack(&bytes, &dest, &Limits::default()).unwrap_err();
            assert!(is_expected(&err), "case {i}: unexpected {err}");
            assert!(!dest.exists(), "case {i}: destination was created");
            assert_eq!(
                fs::read_dir(out.path()).unwrap().count(),
                0,
                "case {i}: debris left"
            );
        }
    }

    #[test]
    fn unpack_refuses_oversize_bundles() {
        use tar::EntryType as T;
        let big = vec![b'a'; 10_000];
        let bytes = hostile(&[("big.csv", T::Regular, &big)]);
        let out = tempfile::tempdir().unwrap();
        let small = Limits {
            max_unpacked: 9_999,
            ..Limits::default()
        };
        assert!(matches!(
            unpack(&bytes, &out.path().join("b"), &small),
            Err(BundleError::TooLarge {
                what: "unpacked size",
                ..
            })
        ));
        let tiny = Limits {
            max_packed: 10,
            ..Limits::default()
        };
        assert!(matches!(
            unpack(&bytes, &out.path().join("c"), &tiny),
            Err(BundleError::TooLarge {
                what: "packed size",
                ..
            })
        ));
        let few = Limits {
            max_entries: 1,
            ..Limits::default()
        };
        let two = hostile(&[("a", T::Regular, b"1"), ("b", T::Regular, b"2")]);
        assert!(matches!(
            unpack(&two, &out.path().join("d"), &few),
            Err(BundleError::TooManyEntries(1))
        ));
    }

    /// One tar entry written as given: `size` goes into the header whatever `data` holds, and
    /// `pax_size`, if any, into a PAX `size` record just before it.
    struct Raw<'a> {
        name: &'a str,
        size: u64,
        pax_size: Option<u64>,
        data: &'a [u8],
    }

    impl Raw<'_> {
        fn honest<'a>(name: &'a str, data: &'a [u8]) -> Raw<'a> {
            Raw {
                name,
                size: data.len() as u64,
                pax_size: None,
                data,
            }
        }
    }

    /// A PAX extended-header body with one `size` record (`"<len> size=<n>\n"`, where `<len>`
    /// counts the whole record, its own digits included).
    fn pax_size_record(n: u64) -> Vec<u8> {
        let body = format!(" size={n}\n");
        let mut len = body.len() + 1;
        while len.to_string().len() + body.len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    /// A gzipped tar of regular files written header by header, sizes and all, as given.
    fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
        let gz = GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), Compression::fast());
        let mut b = tar::Builder::new(gz);
        for e in entries {
            if let Some(n) = e.pax_size {
                let rec = pax_size_record(n);
                let mut h = tar::Header::new_ustar();
                h.set_path("PaxHeaders/x").unwrap();
                h.set_entry_type(tar::EntryType::XHeader);
                h.set_mode(0o644);
                h.set_size(rec.len() as u64);
                h.set_cksum();
                b.append(&h, rec.as_slice()).unwrap();
            }
            let mut h = tar::Header::new_gnu();
            h.set_path(e.name).unwrap();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(e.size);
            h.set_cksum();
            b.append(&h, e.data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    /// `unpack` into a fresh directory with `max_unpacked` as the cap; the error, if any, after
    /// checking that nothing was left behind.
    fn unpack_capped(
        bytes: &[u8],
        max_unpacked: u64,
    ) -> (tempfile::TempDir, Result<Unpacked, BundleError>) {
        let out = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_unpacked,
            ..Limits::default()
        };
        let r = unpack(bytes, &out.path().join("b"), &limits);
        if r.is_err() {
            assert_eq!(
                fs::read_dir(out.path()).unwrap().count(),
                0,
                "a refused bundle left debris"
            );
        }
        (out, r)
    }

    #[test]
    fn a_pax_size_record_is_the_size_the_cap_counts() {
        // The header says 10 bytes, the PAX record (which tar readers obey) 100,000.
        let data = vec![b'a'; 100_000];
        let bytes = raw_tar(&[Raw {
            name: "big.csv",
            size: 10,
            pax_size: Some(100_000),
            data: &data,
        }]);
        let (_out, r) = unpack_capped(&bytes, 50_000);
        assert!(
            matches!(
                r,
                Err(BundleError::TooLarge {
                    what: "unpacked size",
                    ..
                })
            ),
            "{r:?}"
        );
        // Under the cap, the file is written whole: its real size, not the header's.
        let (out, r) = unpack_capped(&bytes, 200_000);
        assert_eq!(r.unwrap().bytes, 100_000);
        assert_eq!(fs::read(out.path().join("b/big.csv")).unwrap(), data);
    }

    #[test]
    fn a_header_size_near_u64_max_does_not_wrap_the_cap() {
        // 1,000 bytes counted, then an entry whose header size would wrap the sum to a small
        // number; its PAX record makes it 100,000 bytes for the tar reader.
        let small = vec![b'x'; 1_000];
        let big = vec![b'a'; 100_000];
        let bytes = raw_tar(&[
            Raw::honest("a.csv", &small),
            Raw {
                name: "b.csv",
                size: u64::MAX - 500,
                pax_size: Some(100_000),
                data: &big,
            },
        ]);
        let (_out, r) = unpack_capped(&bytes, 50_000);
        assert!(
            matches!(
                r,
                Err(BundleError::TooLarge {
                    what: "unpacked size",
                    ..
                })
            ),
            "{r:?}"
        );
        // Without a PAX record such a header is refused as corrupt.
        let bytes = raw_tar(&[
            Raw::honest("a.csv", &small),
            Raw {
                name: "b.csv",
                size: u64::MAX - 500,
                pax_size: None,
                data: &big,
            },
        ]);
        let (_out, r) = unpack_capped(&bytes, 50_000);
        assert!(r.is_err(), "{r:?}");
    }

    #[test]
    fn an_entry_shorter_than_declared_is_refused() {
        // The header declares 5,000 bytes; the archive ends after 1,000 (and the padding and
        // end-of-archive blocks the builder adds).
        let data = vec![b'a'; 1_000];
        let bytes = raw_tar(&[Raw {
            name: "short.csv",
            size: 5_000,
            pax_size: None,
            data: &data,
        }]);
        let (_out, r) = unpack_capped(&bytes, 1 << 20);
        assert!(
            matches!(&r, Err(BundleError::Truncated { entry, declared: 5_000, .. }) if entry == "short.csv"),
            "{r:?}"
        );
    }

    #[test]
    fn sha256_ids_are_validated() {
        assert!(is_sha256_hex(&sha256_hex(b"x")));
        assert!(!is_sha256_hex("../etc/passwd"));
        assert!(!is_sha256_hex(&sha256_hex(b"x").to_uppercase()));
    }
}
