//! One test per fuzzing finding that was fixed (docs/reliability.md, "Fuzzing"), through the
//! public API as the agent and the controller use it. The inputs that found them are replayed by
//! every run of the targets from `fuzz/regressions/`.

use std::io::Write;

use fleet_common::bundle::{unpack, Limits};

/// An entry of [`raw_tar`]: name, content, and a checksum field to write instead of the real one.
type RawEntry<'a> = (&'a [u8], &'a [u8], Option<&'a [u8]>);

/// A gzipped tar of raw headers: `name` goes in as bytes, `cksum` (when given) replaces the
/// header checksum field, so both can hold what no well-behaved packer writes.
fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut tar = Vec::new();
    for (name, data, cksum) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        if let Some(c) = cksum {
            h.as_old_mut().cksum[..c.len()].copy_from_slice(c);
        }
        tar.extend_from_slice(h.as_bytes());
        tar.extend_from_slice(data);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }
    tar.resize(tar.len() + 1024, 0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

fn unpack_error(bundle: &[u8]) -> String {
    let out = tempfile::tempdir().unwrap();
    unpack(bundle, &out.path().join("b"), &Limits::default())
        .unwrap_err()
        .to_string()
}

/// The tar reader's own messages quote the entry's path as it is in the archive.
#[test]
fn a_corrupt_header_is_refused_in_one_line() {
    let e = unpack_error(&raw_tar(&[(b"X = 1\n", b"", Some(b"zz"))]));
    assert!(e.starts_with("bundle is not a valid gzipped tar: "), "{e}");
    assert!(e.contains("X = 1"), "{e}");
    assert!(!e.contains('\n'), "{e:?}");
}

/// A file error names the path being written, which holds the entry's name.
#[test]
fn a_write_error_on_a_hostile_name_is_one_line() {
    let e = unpack_error(&raw_tar(&[
        (b"d\n", b"x", None),
        (b"d\n/f\x1b[2J", b"y", None),
    ]));
    assert!(e.contains("/b") || e.contains("unpack"), "{e}");
    assert!(!e.contains(['\n', '\x1b']), "{e:?}");
}
