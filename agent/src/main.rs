//! `fleet-agent [--config PATH] [--user-data-file PATH] [--set key=value]...`
//!
//! Exit codes: 0 after SIGTERM/SIGINT, 64 (EX_USAGE) for a bad command line, config or
//! user-data (including IMDS unreachable when the config needs user-data), 1 for anything that
//! stops the agent at run time. Errors are one line on stderr. User-data: docs/user-data.md.

use fleet_agent::config::{self, Layers, ProcessEnv, UserData, DEFAULT_CONFIG_PATH};
use fleet_agent::imds::{self, ImdsClient};

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
                println!(
                    "{USAGE}\nConfig keys and sources: docs/agent-config.md; user-data: docs/user-data.md"
                );
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

/// Reads the config layers, then user-data (file or IMDS), and merges them.
async fn load(args: &Args) -> Result<config::Config, String> {
    let env_config = std::env::var("FLEET_AGENT_CONFIG").ok();
    let (path, explicit) = match (&args.config, env_config) {
        (Some(p), _) => (p.clone(), true),
        (None, Some(p)) => (p, true),
        (None, None) => (DEFAULT_CONFIG_PATH.to_string(), false),
    };
    let mut layers = Layers::default();
    match std::fs::read_to_string(&path) {
        Ok(text) => layers.file = config::parse_source(&path, &text)?,
        Err(e) if explicit || e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot read config {path}: {e}"))
        }
        Err(_) => {}
    }
    layers.env = config::env_source(&ProcessEnv);
    layers.flags = config::flag_source(&args.sets)?;
    let user_data = if let Some(p) = &args.user_data {
        let raw = std::fs::read(p).map_err(|e| format!("cannot read user-data {p}: {e}"))?;
        layers.user_data = Some(config::parse_user_data(p, &raw)?);
        UserData::NotFetched
    } else if layers.imds()? {
        let text = |e: imds::ImdsError| e.to_string();
        let endpoint = imds::endpoint_from_env(&ProcessEnv).map_err(text)?;
        let client = ImdsClient::new(&endpoint).map_err(text)?;
        client.user_data().await.map_err(text)?
    } else {
        UserData::NotFetched
    };
    let (cfg, note) = config::resolve(layers, user_data)?;
    if let Some(note) = note {
        fleet_agent::log!("{note}");
    }
    Ok(cfg)
}

enum Failure {
    /// A bad command line, config or user-data: exit 64.
    Usage(String),
    /// Anything that stops the agent once it runs: exit 1.
    Runtime(String),
}

async fn run() -> Result<(), Failure> {
    let args = parse_args().map_err(Failure::Usage)?;
    let cfg = load(&args).await.map_err(Failure::Usage)?;
    // Everything checkable is checked before starting: the secrets and the CA must be
    // readable and valid, or the agent exits 64 with one line instead of retrying forever.
    let ca = cfg.ca_pem().map_err(Failure::Usage)?;
    fleet_common::client::tls_config(&ca).map_err(|e| Failure::Usage(e.to_string()))?;
    cfg.token().map_err(Failure::Usage)?;
    let node_id = cfg
        .node_id
        .clone()
        .unwrap_or_else(fleet_agent::agent::default_node_id);
    fleet_agent::agent::run(cfg, node_id)
        .await
        .map_err(|e| Failure::Runtime(e.to_string()))
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run()) {
        Ok(()) => {}
        Err(Failure::Usage(e)) => {
            eprintln!("fleet-agent: {e}");
            std::process::exit(64);
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("fleet-agent: {e}");
            std::process::exit(1);
        }
    }
}
