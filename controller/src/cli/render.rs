//! The one renderer. Every command returns a value that is both `Serialize` and `Display`;
//! this prints it as text (its `Display`) or, with `--output json`, as pretty JSON. Progress
//! (bars and notes on stderr) is shown only with text output, so JSON on stdout stays clean.

use std::fmt::Display;
use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// `--output`: what stdout carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// What `--output` makes of a command's result: its `Display` ending with one newline (nothing
/// when empty), or pretty JSON.
pub fn render(output: Output, value: &(impl Serialize + Display)) -> Result<String> {
    Ok(match output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(value)?),
        Output::Text => {
            let mut text = value.to_string();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text
        }
    })
}

/// Prints a command's result on stdout.
pub fn print(output: Output, value: &(impl Serialize + Display)) -> Result<()> {
    print!("{}", render(output, value)?);
    Ok(())
}

/// A note on stderr, for text output only.
pub fn say(output: Output, line: impl Display) {
    if output == Output::Text {
        eprintln!("{line}");
    }
}

/// A progress bar over `len` steps (hidden with JSON output).
pub fn bar(output: Output, len: u64, msg: &str) -> ProgressBar {
    if output == Output::Json {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg:28} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// A progress bar over a duration, with a prefix and a message (hidden with JSON output).
pub fn timer(output: Output, duration: Duration, prefix: String) -> ProgressBar {
    if output == Output::Json {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(duration.as_millis() as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{bar:16}] {elapsed:>3} {wide_msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb.set_message("starting");
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// `s` with every control character written as an escape (`\u{1b}`), so that nothing a node
/// reports can move the cursor, clear the screen or forge lines in a terminal or a log.
pub fn escape(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Two {
        a: u32,
    }
    impl Display for Two {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a is {}", self.a)
        }
    }

    #[test]
    fn text_ends_with_one_newline_and_json_is_pretty() {
        assert_eq!(render(Output::Text, &Two { a: 2 }).unwrap(), "a is 2\n");
        assert_eq!(
            render(Output::Json, &Two { a: 2 }).unwrap(),
            "{\n  \"a\": 2\n}\n"
        );
        assert_eq!(render(Output::Text, &"line\n").unwrap(), "line\n");
        assert_eq!(render(Output::Text, &"").unwrap(), "");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("plain é"), "plain é");
        assert_eq!(escape("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\u{a}");
    }
}
