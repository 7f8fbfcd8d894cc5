//! `fleet-agent [--config PATH] [--user-data-file PATH] [--set key=value]...`
//!
//! Exit codes: 0 after SIGTERM/SIGINT, 64 (EX_USAGE) for a bad command line or config, 1 for
//! anything that stops the agent at run time. Errors are one line on stderr.

use fleet_agent::config::{self, Table, DEFAULT_CONFIG_PATH};

const USAGE: &str =
    "usage: fleet-agent [--config PATH] [--user-data-file PATH] [--set key=value]... [--version]";

struct Args {
    config: Option<String>,
    user_data: Option<String>,
    sets: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        config: None,
        user_data: None,
        sets: vec![],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value; {USAGE}"))
        };
        match arg.as_str() {
            "--version" | "-V" => {
                println!("fleet-agent {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            "--help" | "-h" => {
                println!("{USAGE}\nConfig keys and sources: docs/agent-config.md");
                std::process::exit(0);
            }
            "--config" => a.config = Some(value("--config")?),
            "--user-data-file" => a.user_data = Some(value("--user-data-file")?),
            "--set" => a.sets.push(value("--set")?),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    Ok(a)
}

fn load(args: &Args) -> Result<config::Config, String> {
    let env_config = std::env::var("FLEET_AGENT_CONFIG").ok();
    let (path, explicit) = match (&args.config, env_config) {
        (Some(p), _) => (p.clone(), true),
        (None, Some(p)) => (p, true),
        (None, None) => (DEFAULT_CONFIG_PATH.to_string(), false),
    };
    let mut layers: Vec<Table> = vec![];
    match std::fs::read_to_string(&path) {
        Ok(text) => layers.push(config::parse_source(&path, &text)?),
        Err(e) if explicit || e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot read config {path}: {e}"))
        }
        Err(_) => {}
    }
    if let Some(p) = &args.user_data {
        let text =
            std::fs::read_to_string(p).map_err(|e| format!("cannot read user-data {p}: {e}"))?;
        layers.push(config::parse_source("user-data", &text)?);
    }
    layers.push(config::env_source(&config::ProcessEnv));
    layers.push(config::flag_source(&args.sets)?);
    config::merge(&layers)
}

fn main() {
    // Everything checkable is checked before starting: the secrets and the CA must be
    // readable and valid, or the agent exits 64 with one line instead of retrying forever.
    let checked = parse_args().and_then(|a| load(&a)).and_then(|c| {
        let ca = c.ca_pem()?;
        fleet_common::client::tls_config(&ca).map_err(|e| e.to_string())?;
        c.token()?;
        Ok(c)
    });
    let cfg = match checked {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleet-agent: {e}");
            std::process::exit(64);
        }
    };
    let node_id = cfg
        .node_id
        .clone()
        .unwrap_or_else(fleet_agent::agent::default_node_id);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(fleet_agent::agent::run(cfg, node_id)) {
        eprintln!("fleet-agent: {e}");
        std::process::exit(1);
    }
}
