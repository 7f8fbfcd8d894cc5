//! `fleet`: parse the command line, run one command, print one line on failure.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use fleet::backend::any::AnyBackend;
use fleet::backend::local::Local;
use fleet::backend::Backend;
use fleet::config::Fleet;
use fleet::ops::{self, Output};
use fleet_common::wire::{routes, SwarmRequest};

#[derive(Parser)]
#[command(
    name = "fleet",
    version,
    about = "Bootstrap and steer swarms of Locust load generators"
)]
struct Cli {
    /// The fleet directory (made by `fleet init`).
    #[arg(long, global = true, env = "FLEET_DIR", default_value = ".")]
    dir: PathBuf,
    /// Output format for scripts.
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: OutputArg,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputArg {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    /// Agents as processes on this machine.
    Local,
    /// EC2 instances launched with RunInstances, found by their `fleet` tag.
    Ec2,
    /// An Auto Scaling group sized with SetDesiredCapacity.
    Asg,
}

async fn backend(fleet: &Fleet, b: BackendArg) -> Result<AnyBackend> {
    Ok(match b {
        BackendArg::Local => AnyBackend::Local(Box::new(Local::new(fleet))),
        BackendArg::Ec2 => {
            AnyBackend::Ec2(Box::new(fleet::backend::ec2::Ec2::new(fleet, "ec2").await?))
        }
        BackendArg::Asg => AnyBackend::Asg(Box::new(fleet::backend::asg::Asg::new(fleet).await?)),
    })
}

#[derive(Subcommand)]
enum Cmd {
    /// Make a fleet directory: fleet.toml, CA and server certificate, signing key, tokens, UI password.
    Init {
        #[arg(long, default_value = "fleet")]
        name: String,
        /// Address `fleet serve` listens on.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        /// URL agents use to reach the controller (default: from --listen).
        #[arg(long)]
        url: Option<String>,
        /// Extra names or addresses for the server certificate.
        #[arg(long = "cert-name")]
        cert_names: Vec<String>,
        /// The `locust` executable for the master and local agents.
        #[arg(long, default_value = "locust")]
        locust: String,
        /// The host the sample locustfile targets.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        target: String,
        /// Replace existing secrets.
        #[arg(long)]
        force: bool,
    },
    /// Make a new web UI password (printed once; only its hash is stored).
    Passwd,
    /// Render the nginx front (docs/nginx.md): fleet.conf, htpasswd with the UI password, runtime dirs.
    #[command(group(clap::ArgGroup::new("password").required(true).args(["password_stdin", "new_password"])))]
    Nginx {
        /// Output directory (default: nginx/ in the fleet directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where nginx listens for HTTPS: ADDR:PORT or PORT (default 443).
        #[arg(long)]
        listen: Option<String>,
        /// nginx's server_name (default `_`).
        #[arg(long)]
        server_name: Option<String>,
        /// Certificate chain nginx serves (default: the fleet's certs/server.pem).
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Its private key (default: the fleet's certs/server.key).
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// The account nginx's workers run as when nginx starts as root (default www-data).
        #[arg(long)]
        user: Option<String>,
        /// Read the current web UI password from stdin (one line); it is checked first.
        #[arg(long)]
        password_stdin: bool,
        /// Make a new web UI password for the controller and nginx (printed once).
        #[arg(long)]
        new_password: bool,
    },
    /// Run the controller: HTTPS API, spec watcher, Locust master.
    Serve,
    /// Converge the fleet to N nodes, up or down.
    Scale {
        #[arg(long, allow_hyphen_values = true)]
        nodes: i64,
        #[arg(long, value_enum, default_value = "local")]
        backend: BackendArg,
        /// Print the plan, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Seconds to wait for the agents to check in (0: do not wait).
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
    /// Print the EC2 user-data a node needs (the agent reads it over IMDSv2).
    UserData {
        #[arg(long, value_enum, default_value = "ec2")]
        backend: BackendArg,
    },
    /// Terminate every node the fleet owns.
    Down {
        #[arg(long, value_enum, default_value = "local")]
        backend: BackendArg,
    },
    /// The fleet's nodes: what the backend says joined with what each agent reports.
    Status {
        #[arg(long, value_enum, default_value = "local")]
        backend: BackendArg,
    },
    /// Start (or resize) the test through the controller.
    Swarm {
        #[arg(long)]
        users: u64,
        #[arg(long, default_value_t = 10.0)]
        spawn_rate: f64,
    },
    /// Stop the running test.
    Stop,
    /// Run a test (or a matrix of tests) and write its reports: Locust's CSVs and HTML, summary.md/json.
    Run {
        /// Users for one run.
        #[arg(long, required_unless_present = "matrix", conflicts_with = "matrix")]
        users: Option<u64>,
        /// A matrix over user counts, e.g. `users=200,400,800` (one run per node count and user count).
        #[arg(long)]
        matrix: Option<String>,
        #[arg(long, default_value_t = 10.0)]
        spawn_rate: f64,
        /// How long each run lasts: `30s`, `5m`.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
        /// The results directory (default: results/<UTC timestamp>/ in the fleet directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Scale to this many nodes first (with --matrix: a list, e.g. 2,4).
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
        nodes: Vec<i64>,
        #[arg(long, value_enum, default_value = "local")]
        backend: BackendArg,
        /// Seconds to wait for the agents to check in after scaling.
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
    /// Run the sample HTTP target.
    Target {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// The quick start: a local swarm (controller, Locust master, agents, sample target) in one command.
    Demo {
        #[arg(long, default_value_t = 3)]
        agents: usize,
        #[arg(long, default_value_t = 10)]
        users: u64,
        #[arg(long, default_value_t = 5.0)]
        spawn_rate: f64,
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        #[arg(long, default_value = "127.0.0.1:8080")]
        target_listen: std::net::SocketAddr,
        #[arg(long, default_value = "locust")]
        locust: String,
    },
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialises"));
}

async fn post(fleet: &Fleet, path: &str, body: serde_json::Value) -> Result<()> {
    let r = fleet
        .operator_client()?
        .post_json(path, serde_json::to_vec(&body)?, Duration::from_secs(30))
        .await
        .map_err(|e| anyhow::anyhow!("controller unreachable ({e}); is `fleet serve` running?"))?;
    if r.status != 200 {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        bail!(
            "{}",
            v.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("the controller refused the request")
        );
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let output = match cli.output {
        OutputArg::Text => Output::Text,
        OutputArg::Json => Output::Json,
    };
    match cli.cmd {
        Cmd::Init {
            name,
            listen,
            url,
            cert_names,
            locust,
            target,
            force,
        } => {
            let r = fleet::init::init(
                &cli.dir,
                &fleet::init::InitOptions {
                    name,
                    listen,
                    url,
                    cert_names,
                    locust,
                    target,
                    force,
                },
            )?;
            if output == Output::Json {
                print_json(
                    &serde_json::json!({ "created": r.created, "kept": r.kept, "password": r.password }),
                );
            } else {
                for c in &r.created {
                    println!("created {c}");
                }
                if !r.kept.is_empty() {
                    println!(
                        "kept {} (use --force to replace secrets)",
                        r.kept.join(", ")
                    );
                }
                if let Some(p) = r.password {
                    println!("web UI user: {}  password: {p}", fleet::daemon::UI_USER);
                    println!("the password is shown only now; `fleet passwd` makes a new one");
                }
            }
        }
        Cmd::Passwd => {
            let fleet = Fleet::load(&cli.dir)?;
            let p = fleet::init::set_password(&fleet)?;
            println!("web UI user: {}  password: {p}", fleet::daemon::UI_USER);
            println!("restart `fleet serve` to use it");
        }
        Cmd::Nginx {
            out,
            listen,
            server_name,
            cert,
            key,
            user,
            password_stdin,
            new_password: _,
        } => {
            let fleet = Fleet::load(&cli.dir)?;
            let password = if password_stdin {
                fleet::nginx::Password::Given(fleet::nginx::read_password(std::io::stdin().lock())?)
            } else {
                fleet::nginx::Password::New
            };
            let o = fleet::nginx::NginxOptions {
                out,
                listen,
                server_name,
                cert,
                key,
                user,
                password,
            };
            fleet::nginx::command(&fleet, &o, output)?;
        }
        Cmd::Serve => {
            let fleet = Fleet::load(&cli.dir)?;
            fleet::daemon::serve(&fleet).await?;
        }
        Cmd::Scale {
            nodes,
            backend: b,
            dry_run,
            wait,
        } => {
            let fleet = Fleet::load(&cli.dir)?;
            // Bad input fails before any AWS client is made or anything launched.
            let nodes = ops::check_nodes(&fleet, nodes)?;
            let be = backend(&fleet, b).await?;
            let r = ops::scale(
                &fleet,
                &be,
                nodes,
                dry_run,
                Duration::from_secs(wait),
                output,
            )
            .await?;
            if output == Output::Json {
                print_json(&r);
            } else if dry_run {
                println!(
                    "plan: launch {}, terminate {} ({}), clean up {} dead; {} live now",
                    r.plan.launch,
                    r.plan.terminate.len(),
                    r.plan.terminate.join(", "),
                    r.plan.cleanup.len(),
                    r.live
                );
            } else {
                println!(
                    "{} nodes ({} launched, {} terminated), {} agents connected, {:.1} s",
                    r.live,
                    r.launched.len(),
                    r.terminated.len(),
                    r.connected,
                    r.seconds
                );
            }
        }
        Cmd::UserData { backend: b } => {
            let fleet = Fleet::load(&cli.dir)?;
            let name = match b {
                BackendArg::Local => "local",
                BackendArg::Ec2 => "ec2",
                BackendArg::Asg => "asg",
            };
            print!("{}", fleet::userdata::render(&fleet, name)?);
        }
        Cmd::Down { backend: b } => {
            let fleet = Fleet::load(&cli.dir)?;
            let be = backend(&fleet, b).await?;
            let ids: Vec<String> = be.observe().await?.into_iter().map(|n| n.id).collect();
            if be.set_desired(0).await? {
                ops::forget(&fleet, &ids).await;
            } else {
                ops::terminate(&fleet, &be, &ids, output).await?;
            }
            be.teardown().await?;
            if output == Output::Json {
                print_json(&serde_json::json!({ "terminated": ids }));
            } else {
                println!("terminated {} nodes", ids.len());
            }
        }
        Cmd::Status { backend: b } => {
            let fleet = Fleet::load(&cli.dir)?;
            let observed = backend(&fleet, b).await?.observe().await?;
            ops::report_listed(&fleet, &observed).await;
            let views = ops::controller_nodes(&fleet).await?;
            let rows = ops::join_status(&observed, &views);
            if output == Output::Json {
                print_json(&rows);
            } else {
                ops::print_status(&rows);
            }
        }
        Cmd::Swarm { users, spawn_rate } => {
            let fleet = Fleet::load(&cli.dir)?;
            post(
                &fleet,
                routes::API_SWARM,
                serde_json::to_value(SwarmRequest { users, spawn_rate })?,
            )
            .await?;
            println!("test started: {users} users at {spawn_rate}/s");
        }
        Cmd::Run {
            users,
            matrix,
            spawn_rate,
            duration,
            out,
            nodes,
            backend: b,
            wait,
        } => {
            let fleet = Fleet::load(&cli.dir)?;
            let plan = fleet::run::Plan::new(
                &fleet,
                fleet::run::RunArgs {
                    users,
                    matrix,
                    spawn_rate,
                    duration,
                    out,
                    nodes,
                    wait: Duration::from_secs(wait),
                },
            )?;
            let be = match plan.scales() {
                true => Some(backend(&fleet, b).await?),
                false => None,
            };
            fleet::run::run(&fleet, &plan, be.as_ref(), output).await?;
        }
        Cmd::Stop => {
            let fleet = Fleet::load(&cli.dir)?;
            post(&fleet, routes::API_STOP, serde_json::json!({})).await?;
            println!("test stopped");
        }
        Cmd::Target { listen } => {
            let (addr, task) = fleet::target::bind(listen).await?;
            println!("sample target on http://{addr}");
            let _ = task.await;
        }
        Cmd::Demo {
            agents,
            users,
            spawn_rate,
            listen,
            target_listen,
            locust,
        } => {
            fleet::demo::demo(
                &cli.dir,
                &fleet::demo::DemoOptions {
                    agents,
                    users,
                    spawn_rate,
                    target_listen,
                    locust,
                    listen,
                },
            )
            .await?;
        }
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(cli)) {
        // One line: the error and its causes joined.
        eprintln!("fleet: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}
