//! The stats plugin fleet adds to every managed master: `fleet_merged_stats.py`, embedded in
//! the controller, written into the master's workspace at each start and appended to the
//! master's locustfile list (`-f SPEC,PLUGIN`). It serves the raw numbers [`super::merge`]
//! merges across masters at `<web base path>/fleet/stats` (docs/locust.md, "The merged view's
//! source").

use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::MasterError;

/// The plugin's file name, which is also its Python module name: unlike any spec's.
pub const FILE_NAME: &str = "fleet_merged_stats.py";
/// The plugin's source.
pub const SOURCE: &str = include_str!("fleet_merged_stats.py");

/// Writes the plugin into `<workspace>/plugin/` (readable by all, like the spec copy beside it,
/// replaced whole so a running master never reads half a file) and returns its path.
pub fn install(workspace: &Path) -> Result<PathBuf, MasterError> {
    let dir = workspace.join("plugin");
    let io = |p: &Path, e: std::io::Error| {
        MasterError::Confine(format!(
            "cannot write the stats plugin to {}: {e}",
            p.display()
        ))
    };
    match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io(&dir, e)),
        _ => {}
    }
    // The master's user must read it whatever the controller's umask (the unit sets 0077).
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| io(&dir, e))?;
    let path = dir.join(FILE_NAME);
    let tmp = dir.join(format!(".{FILE_NAME}.tmp"));
    std::fs::write(&tmp, SOURCE).map_err(|e| io(&tmp, e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    Ok(path)
}

/// Appends `plugin` to the locustfile list of a master's arguments (the value after `-f`).
/// Locust splits that list at commas, so a path with one cannot be named in it.
pub fn add_to_args(args: &mut [OsString], plugin: &Path) -> Result<(), MasterError> {
    if plugin.as_os_str().as_encoded_bytes().contains(&b',') {
        return Err(MasterError::Confine(format!(
            "the stats plugin's path {} has a comma, which Locust's -f list cannot carry; set TMPDIR to a directory without one",
            plugin.display()
        )));
    }
    let Some(i) = args.iter().position(|a| a == "-f") else {
        return Err(MasterError::Confine(
            "the master's command line names no locustfile (-f); this is a bug in fleet".into(),
        ));
    };
    let files = args.get_mut(i + 1).ok_or_else(|| {
        MasterError::Confine("the master's -f has no value; this is a bug in fleet".into())
    })?;
    files.push(",");
    files.push(plugin);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_is_written_readable_and_replaced_whole() {
        let ws = tempfile::tempdir().unwrap();
        let p = install(ws.path()).unwrap();
        assert_eq!(p, ws.path().join("plugin").join(FILE_NAME));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), SOURCE);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        std::fs::write(&p, "old").unwrap();
        assert_eq!(install(ws.path()).unwrap(), p);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            SOURCE,
            "rewritten at each start"
        );
    }

    #[test]
    fn the_plugin_follows_the_spec_in_the_locustfile_list() {
        let mut args: Vec<OsString> = ["-f", "/ws/spec/locustfile.py", "--master"]
            .iter()
            .map(OsString::from)
            .collect();
        add_to_args(&mut args, Path::new("/ws/plugin/fleet_merged_stats.py")).unwrap();
        assert_eq!(
            args[1],
            "/ws/spec/locustfile.py,/ws/plugin/fleet_merged_stats.py"
        );
        assert_eq!(args.len(), 3);
    }

    #[test]
    fn a_plugin_path_locust_would_split_is_refused_with_what_to_do() {
        let mut args: Vec<OsString> = vec!["-f".into(), "/s/l.py".into()];
        let e = add_to_args(&mut args, Path::new("/tmp/a,b/p.py")).unwrap_err();
        assert!(e.to_string().contains("TMPDIR"), "{e}");
        assert_eq!(args[1], "/s/l.py");
        let e = add_to_args(&mut [], Path::new("/p.py")).unwrap_err();
        assert!(e.to_string().contains("-f"), "{e}");
    }

    #[test]
    fn the_plugin_speaks_the_format_and_route_the_merge_reads() {
        assert!(SOURCE.contains(&format!("FORMAT = {}\n", super::super::merge::FORMAT)));
        assert!(SOURCE.contains(&format!("{}\")", super::super::merge::PATH)));
    }
}
