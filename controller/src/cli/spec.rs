//! `fleet spec push|pull|log|diff|rollback`: the spec through the controller's API, from any
//! machine with the CA and the operator token (docs/protocol.md, "Editing the spec").
//!
//! `pull` writes the version it fetched into `DIR/.fleet-spec` (a hidden file, so never part of
//! the spec); `push` sends it as the change's base, so a push over someone else's publication
//! is refused instead of undoing it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use fleet_common::bundle::{self, Limits};
use fleet_common::client::Response;
use fleet_common::wire::{routes, GateRefusal, SpecVersion, SpecView};
use hyper::Method;
use serde::{Deserialize, Serialize};

use super::api::{Api, SMALL_LIMIT};
use super::remote::Operator;
use super::render::{print, Output};
use crate::daemon::spec::change::mirror;

/// Where `pull` records the version a directory holds.
const BASE_FILE: &str = ".fleet-spec";
/// A change waits for the gate (20 s by default) and a master restart.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// Edit the spec through the controller: push, pull, log, diff, rollback.
#[derive(clap::Args)]
pub struct SpecArgs {
    #[command(subcommand)]
    cmd: SpecCmd,
}

/// (Positional directories are `path`: `dir` is the global `--dir`'s id.)
#[derive(Subcommand)]
enum SpecCmd {
    /// Upload a spec directory: the controller checks it, writes its spec directory and
    /// publishes it.
    Push {
        /// The spec directory to upload.
        #[arg(default_value = "spec", value_name = "DIR")]
        path: PathBuf,
        /// The version the change is based on (default: the one `pull` recorded in DIR).
        #[arg(long, conflicts_with = "force")]
        base: Option<u64>,
        /// Replace the spec whatever was published since.
        #[arg(long)]
        force: bool,
        /// Skip the validation gate (a spec that needs what only the nodes have).
        #[arg(long)]
        no_validate: bool,
    },
    /// Download a version of the spec into a directory (new, empty, or pulled before).
    Pull {
        /// Where to write it.
        #[arg(default_value = "spec", value_name = "DIR")]
        path: PathBuf,
        /// A sequence, `current` or `dir` (the controller's spec directory as it is).
        #[arg(long, default_value = "current")]
        version: String,
    },
    /// The published versions, newest first, and the last refusal.
    Log,
    /// What changed from version A to version B (sequences, `current` or `dir`).
    Diff {
        a: String,
        #[arg(default_value = "current")]
        b: String,
    },
    /// Publish the content of an earlier version again, as a new version.
    Rollback {
        sequence: u64,
        #[arg(long)]
        no_validate: bool,
    },
}

/// What a directory was pulled or pushed as.
#[derive(Debug, Serialize, Deserialize)]
struct Base {
    sequence: u64,
    sha256: String,
}

fn read_base(dir: &Path) -> Option<Base> {
    serde_json::from_slice(&std::fs::read(dir.join(BASE_FILE)).ok()?).ok()
}

fn write_base(dir: &Path, v: &SpecVersion) -> Result<()> {
    let b = Base {
        sequence: v.sequence,
        sha256: v.sha256.clone(),
    };
    std::fs::write(dir.join(BASE_FILE), serde_json::to_vec_pretty(&b)?)
        .with_context(|| format!("cannot write {}", dir.join(BASE_FILE).display()))
}

/// A change the controller published (or already had).
#[derive(Debug, Serialize, Deserialize)]
pub struct Published {
    pub published: SpecVersion,
    pub changed: bool,
}

impl fmt::Display for Published {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = &self.published;
        if self.changed {
            write!(
                f,
                "published sequence {} (bundle {}, {})",
                v.sequence,
                short(&v.sha256),
                v.origin
            )
        } else {
            write!(
                f,
                "no change: sequence {} already has this spec",
                v.sequence
            )
        }
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// `fleet spec pull`'s result.
#[derive(Debug, Serialize)]
pub struct Pulled {
    pub dir: PathBuf,
    pub sequence: Option<u64>,
    pub sha256: String,
    pub files: usize,
}

impl fmt::Display for Pulled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.sequence {
            Some(s) => format!("sequence {s}"),
            None => "the unpublished spec directory".into(),
        };
        write!(
            f,
            "pulled {what} (bundle {}, {} files) into {}",
            short(&self.sha256),
            self.files,
            self.dir.display()
        )
    }
}

/// `fleet spec log`'s result: `/api/spec` as it is.
#[derive(Debug, Serialize)]
pub struct Log(pub SpecView);

impl fmt::Display for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cur = self.0.current.as_ref().map(|c| c.sequence);
        writeln!(
            f,
            "  {:>6}  {:20}  {:12}  ORIGIN",
            "SEQ", "CREATED", "BUNDLE"
        )?;
        for v in &self.0.history {
            let mark = if Some(v.sequence) == cur { '*' } else { ' ' };
            writeln!(
                f,
                "{mark} {:>6}  {:20}  {:12}  {}",
                v.sequence,
                v.created,
                short(&v.sha256),
                v.origin
            )?;
        }
        writeln!(f, "validation gate: {}", self.0.gate)?;
        if let Some(e) = &self.0.last_error {
            writeln!(f, "not published: {e}")?;
        }
        if let Some(r) = &self.0.refused {
            for line in &r.output {
                writeln!(f, "  | {line}")?;
            }
        }
        Ok(())
    }
}

/// `fleet spec diff`'s result.
#[derive(Debug, Serialize, Deserialize)]
pub struct Diff {
    pub from: serde_json::Value,
    pub to: serde_json::Value,
    pub files: Vec<FileDiff>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FileDiff {
    pub path: String,
    pub change: String,
    pub binary: bool,
    pub diff: String,
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.files.is_empty() {
            return f.write_str("no difference");
        }
        for d in &self.files {
            f.write_str(&d.diff)?;
        }
        Ok(())
    }
}

/// How a spec is packed and how big it may be: the fleet directory's own settings on the
/// controller host, else what the controller says in `/api/spec` (from a laptop).
struct Rules {
    locustfile: String,
    max_bundle_bytes: u64,
}

impl Rules {
    async fn of(op: &Operator, api: &Api) -> Result<Rules> {
        if let Some(fleet) = op.fleet() {
            let cfg = &fleet.config.controller;
            return Ok(Rules {
                locustfile: cfg.locustfile.clone(),
                max_bundle_bytes: cfg.max_bundle_bytes,
            });
        }
        let view: SpecView = api.get_json(routes::API_SPEC).await?;
        match view.rules {
            Some(r) => Ok(Rules {
                locustfile: r.locustfile,
                max_bundle_bytes: r.max_bundle_bytes,
            }),
            None => bail!(
                "the controller does not say how it packs specs (an older fleet): run `fleet spec` \
                 on the controller host, in its fleet directory"
            ),
        }
    }
}

impl SpecArgs {
    pub async fn run(self, op: &Operator, out: Output) -> Result<()> {
        let api = op.api()?;
        match self.cmd {
            SpecCmd::Push {
                path: dir,
                base,
                force,
                no_validate,
            } => {
                let rules = Rules::of(op, &api).await?;
                let p = push(&api, &rules, &dir, base, force, !no_validate, out).await?;
                print(out, &p)
            }
            SpecCmd::Pull { path: dir, version } => {
                let rules = Rules::of(op, &api).await?;
                print(out, &pull(&api, &rules, &dir, &version).await?)
            }
            SpecCmd::Log => print(out, &Log(api.get_json(routes::API_SPEC).await?)),
            SpecCmd::Diff { a, b } => {
                let path = format!("{}?from={}&to={}", routes::API_SPEC_DIFF, enc(&a), enc(&b));
                print(out, &api.get_json::<Diff>(&path).await?)
            }
            SpecCmd::Rollback {
                sequence,
                no_validate,
            } => {
                let body = serde_json::json!({ "sequence": sequence, "validate": !no_validate });
                let r = api
                    .send(
                        Method::POST,
                        routes::API_SPEC_ROLLBACK,
                        Some(("application/json", body.to_string().into_bytes())),
                        SMALL_LIMIT,
                        CHANGE_TIMEOUT,
                    )
                    .await?;
                print(out, &changed(&api, &r, "POST /api/spec/rollback", out)?)
            }
        }
    }
}

/// A version name for a query string: sequences and words only.
fn enc(v: &str) -> String {
    v.chars().filter(|c| c.is_ascii_alphanumeric()).collect()
}

/// The answer to a change: published, or the controller's refusal as one line (a gate
/// refusal's Locust output goes to stderr first, or the whole answer to stdout with JSON).
fn changed(api: &Api, r: &Response, what: &str, out: Output) -> Result<Published> {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    match r.status {
        200 => serde_json::from_value(v).with_context(|| format!("{what}: not the JSON expected")),
        422 => {
            let refusal: Option<GateRefusal> = serde_json::from_value(v["refused"].clone()).ok();
            if out == Output::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if let Some(r) = &refusal {
                for line in &r.output {
                    eprintln!("  | {line}");
                }
            }
            let reason = refusal.map(|r| r.reason).unwrap_or_default();
            Err(anyhow!(
                "the controller's validation gate refused the spec: {reason}; fix it and try \
                 again, or pass --no-validate if it needs what only the nodes have"
            ))
        }
        409 => Err(anyhow!(
            "{} (or pass --force to replace it)",
            v["error"]
                .as_str()
                .unwrap_or("the spec changed since your base version")
        )),
        _ => Err(api.refused(r, what)),
    }
}

async fn push(
    api: &Api,
    rules: &Rules,
    dir: &Path,
    base: Option<u64>,
    force: bool,
    validate: bool,
    out: Output,
) -> Result<Published> {
    let limits = Limits {
        max_packed: rules.max_bundle_bytes,
        ..Limits::default()
    };
    let packed = bundle::pack_dir(dir, &rules.locustfile, &limits)
        .map_err(|e| anyhow!("{}: {e}", dir.display()))?;
    let query = match (force, base.or_else(|| read_base(dir).map(|b| b.sequence))) {
        (true, _) => "force=true".to_string(),
        (false, Some(b)) => format!("base={b}"),
        (false, None) => bail!(
            "{} has no recorded base version: pull it first (`fleet spec pull {}`), or pass \
             --base SEQ (see `fleet spec log`) or --force",
            dir.display(),
            dir.display()
        ),
    };
    let path = format!("{}?{query}&validate={validate}", routes::API_SPEC_BUNDLE);
    let r = api
        .send(
            Method::POST,
            &path,
            Some(("application/gzip", packed.bytes)),
            SMALL_LIMIT,
            CHANGE_TIMEOUT,
        )
        .await?;
    let p = changed(api, &r, "POST /api/spec/bundle", out)?;
    write_base(dir, &p.published)?;
    Ok(p)
}

async fn pull(api: &Api, rules: &Rules, dir: &Path, version: &str) -> Result<Pulled> {
    if dir.exists() && read_base(dir).is_none() && has_spec_files(dir)? {
        bail!(
            "{} holds files that were not pulled by `fleet spec pull`; pull into a new or \
             empty directory",
            dir.display()
        );
    }
    let path = format!("{}?version={}", routes::API_SPEC_BUNDLE, enc(version));
    let r = api.get(&path, rules.max_bundle_bytes as usize).await?;
    let sha = r.header("x-fleet-sha256").unwrap_or_default().to_string();
    let sequence = r.header("x-fleet-sequence").and_then(|s| s.parse().ok());
    anyhow::ensure!(
        bundle::sha256_hex(&r.body) == sha,
        "GET {path}: the bundle does not match its sha256 header; retry"
    );
    let limits = Limits {
        max_packed: rules.max_bundle_bytes,
        ..Limits::default()
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(".fleet-pull");
    let _ = std::fs::remove_dir_all(&tmp);
    let unpacked = bundle::unpack(&r.body, &tmp, &limits)
        .map_err(|e| anyhow!("the controller's bundle is refused: {e}"))?;
    let written = mirror(&tmp, dir);
    let _ = std::fs::remove_dir_all(&tmp);
    written.with_context(|| format!("cannot write {}", dir.display()))?;
    match sequence {
        Some(s) => write_base(
            dir,
            &SpecVersion {
                sequence: s,
                sha256: sha.clone(),
                size: r.body.len() as u64,
                master_epoch: 0,
                created: String::new(),
                origin: String::new(),
            },
        )?,
        None => {
            let _ = std::fs::remove_file(dir.join(BASE_FILE));
        }
    }
    Ok(Pulled {
        dir: dir.to_path_buf(),
        sequence,
        sha256: sha,
        files: unpacked.files,
    })
}

/// Whether `dir` holds anything packing would take.
fn has_spec_files(dir: &Path) -> Result<bool> {
    Ok(std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .any(|e| !bundle::is_ignored(&e.file_name().to_string_lossy())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_marks_the_current_version_and_shows_the_refusal() {
        let v = |sequence, origin: &str| SpecVersion {
            sequence,
            sha256: format!("{sequence}").repeat(64),
            size: 1,
            master_epoch: 1,
            created: "2025-01-01T00:00:00Z".into(),
            origin: origin.into(),
        };
        let view = SpecView {
            current: Some(v(2, "push")),
            history: vec![v(2, "push"), v(1, "directory")],
            last_error: Some("spec not published: SyntaxError: invalid syntax".into()),
            refused: Some(GateRefusal {
                sha256: "f".repeat(64),
                origin: "directory".into(),
                reason: "SyntaxError: invalid syntax".into(),
                output: vec!["    def x(:".into(), "SyntaxError: invalid syntax".into()],
                at: "2025-01-01T00:00:01Z".into(),
            }),
            gate: "locust -f <spec> --list (timeout 20 s)".into(),
            rules: None,
        };
        let text = Log(view).to_string();
        assert!(
            text.contains("*      2  2025-01-01T00:00:00Z  222222222222  push"),
            "{text}"
        );
        assert!(
            text.contains("       1  2025-01-01T00:00:00Z  111111111111  directory"),
            "{text}"
        );
        assert!(
            text.contains("not published: spec not published: SyntaxError"),
            "{text}"
        );
        assert!(text.contains("  |     def x(:"), "{text}");
    }

    #[test]
    fn version_names_in_queries_keep_only_letters_and_digits() {
        assert_eq!(enc("12"), "12");
        assert_eq!(enc("current&force=true"), "currentforcetrue");
    }
}
