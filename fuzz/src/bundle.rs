//! Bundle unpacking (`fleet_common::bundle::unpack`), the agent's side of the bundle format.
//!
//! Input: one mode byte, then the archive. Bit 0 set: the rest is the bundle as downloaded
//! (gzip around tar). Clear: the rest is a tar stream whose header checksums the target fixes
//! up before gzipping it, so mutations reach the header fields instead of dying in the gzip CRC
//! or the header checksum. Bits 1 and 2 pick small caps so the size and entry checks are
//! reached too.
//!
//! Properties: an accepted bundle wrote only directories and regular files (0644 or 0755) under
//! the destination, exactly the files and bytes it reports, within the caps; a refused one left
//! nothing behind; every refusal is one line.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use fleet_common::bundle::{unpack, Limits, Unpacked};

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_packed: 1 << 20,
        max_unpacked: if mode & 2 != 0 { 100 } else { 1 << 20 },
        max_entries: if mode & 4 != 0 { 3 } else { 100 },
    };
    let bytes = if mode & 1 != 0 {
        rest.to_vec()
    } else {
        let mut tar = rest.to_vec();
        fix_checksums(&mut tar);
        gzip(&tar)
    };
    let parent = crate::scratch().join("bundle");
    let _ = fs::remove_dir_all(&parent);
    fs::create_dir_all(&parent).unwrap();
    let dest = parent.join("b");
    match unpack(&bytes, &dest, &limits) {
        Ok(stats) => {
            let found = walk(&dest);
            assert_eq!(found.files, stats.files, "files reported vs written");
            assert_eq!(found.bytes, stats.bytes, "bytes reported vs written");
            assert!(found.dirs >= stats.dirs, "directories reported vs written");
            assert!(stats.bytes <= limits.max_unpacked, "over the unpacked cap");
            assert!(
                stats.files + stats.dirs <= limits.max_entries,
                "over the entry cap"
            );
            assert_eq!(entries(&parent), ["b"], "debris beside the destination");
        }
        Err(e) => {
            crate::assert_one_line("unpack", &e.to_string());
            assert!(!dest.exists(), "a refused bundle created the destination");
            assert!(entries(&parent).is_empty(), "a refused bundle left debris");
        }
    }
    let _ = fs::remove_dir_all(&parent);
}

fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    gz.write_all(tar).unwrap();
    gz.finish().unwrap()
}

/// Walks the headers as a tar reader does (each header, then its data rounded up to 512-byte
/// blocks) and writes each header's correct checksum.
fn fix_checksums(tar: &mut [u8]) {
    let mut at = 0usize;
    while at + 512 <= tar.len() {
        let h = &mut tar[at..at + 512];
        if h.iter().all(|b| *b == 0) {
            at += 512;
            continue;
        }
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let blocks = header_size(&h[124..136]).div_ceil(512);
        match usize::try_from(blocks)
            .ok()
            .and_then(|b| b.checked_mul(512))
            .and_then(|n| n.checked_add(at + 512))
        {
            Some(next) => at = next,
            None => return,
        }
    }
}

/// A header's size field: octal digits, or base-256 when the first byte has its top bit set.
fn header_size(field: &[u8]) -> u64 {
    if field[0] & 0x80 != 0 {
        return field[4..].iter().fold(0, |n, b| (n << 8) | u64::from(*b));
    }
    field
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b))
        .fold(0u64, |n, b| {
            n.wrapping_mul(8).wrapping_add(u64::from(b - b'0'))
        })
}

fn entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// What is really under `dir`, refusing anything but directories and plain files.
fn walk(dir: &Path) -> Unpacked {
    let mut found = Unpacked::default();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let meta = fs::symlink_metadata(e.path()).unwrap();
        let ft = meta.file_type();
        if ft.is_dir() {
            found.dirs += 1;
            let sub = walk(&e.path());
            found.files += sub.files;
            found.dirs += sub.dirs;
            found.bytes += sub.bytes;
        } else {
            assert!(ft.is_file(), "{}: not a plain file", e.path().display());
            let mode = meta.permissions().mode() & 0o7777;
            assert!(mode == 0o644 || mode == 0o755, "mode {mode:o}");
            found.files += 1;
            found.bytes += meta.len();
        }
    }
    found
}
