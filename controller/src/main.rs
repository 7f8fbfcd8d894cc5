//! `fleet`: parse the command line, build the runtime, run one command (`fleet::cli`), print
//! one line on failure.

use clap::Parser;

fn main() {
    let cli = fleet::cli::Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(fleet::cli::run(cli)) {
        // One line: the error and its causes joined.
        eprintln!("fleet: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(fleet::cli::exit_code(&e));
    }
}
