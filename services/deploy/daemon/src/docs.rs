//! The configuration reference of a daemon, rendered from its clap definitions (every config
//! field is a flag with the same doc comment), and kept in `docs/daemons/<name>.md` between two
//! markers: a test per daemon renders it and fails when the committed page differs.

use std::path::Path;

use clap::{Args, Command};

use crate::settings::DaemonSettingsFile;

pub const BEGIN: &str = "<!-- BEGIN GENERATED: configuration reference (cargo test renders it; UPDATE_DOCS=1 rewrites) -->";
pub const END: &str = "<!-- END GENERATED -->";

/// Flags that are not config fields.
const NOT_FIELDS: [&str; 3] = ["help", "version", "config"];

/// The Markdown reference of `cmd`: a table of config keys and flags, an example file, and the
/// `--help` text.
pub fn render(cmd: &Command, example_yaml: &str) -> String {
    let mut cmd = cmd.clone().term_width(100);
    let common: Vec<String> = DaemonSettingsFile::augment_args(Command::new("x"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    let mut out = String::from("| Config key | Flag | Meaning |\n|---|---|---|\n");
    for arg in cmd.get_arguments() {
        let id = arg.get_id().to_string();
        let Some(long) = arg.get_long() else { continue };
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        let value = arg
            .get_value_names()
            .map(|v| format!(" <{}>", v.join(" ")))
            .unwrap_or_default();
        let key = if NOT_FIELDS.contains(&id.as_str()) {
            "(flag only)".to_owned()
        } else if common.contains(&id) {
            format!("`daemon.{id}`")
        } else {
            format!("`{id}`")
        };
        out.push_str(&format!(
            "| {key} | `--{long}{value}` | {} |\n",
            help.replace('|', "\\|")
        ));
    }
    out.push_str("\nExample configuration file (YAML; JSON works too):\n\n```yaml\n");
    out.push_str(example_yaml.trim_end());
    out.push_str("\n```\n\n`--help`:\n\n```text\n");
    out.push_str(cmd.render_help().to_string().trim_end());
    out.push_str("\n```\n");
    out
}

/// Compares the generated section of `page` with `generated` (rewriting it when `UPDATE_DOCS`
/// is set). The error says how to fix the page.
pub fn check_page(page: &Path, generated: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(page).map_err(|e| format!("{}: {e}", page.display()))?;
    let (head, rest) = text
        .split_once(BEGIN)
        .ok_or_else(|| format!("{} lacks the marker {BEGIN}", page.display()))?;
    let (current, tail) = rest
        .split_once(END)
        .ok_or_else(|| format!("{} lacks the marker {END}", page.display()))?;
    let wanted = format!("\n{generated}");
    if current == wanted {
        return Ok(());
    }
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(page, format!("{head}{BEGIN}{wanted}{END}{tail}"))
            .map_err(|e| format!("{}: {e}", page.display()))?;
        return Ok(());
    }
    Err(format!(
        "{} is out of date with the config types; run the test with UPDATE_DOCS=1 and commit the page",
        page.display()
    ))
}
