//! Detached node processes: started in their own process group so they outlive the launcher,
//! identified later by pid *and* command line (a reused pid is not mistaken for the node).

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// True if `pid` runs (not a zombie) and its command line contains `marker`.
pub fn running(pid: u32, marker: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if !String::from_utf8_lossy(&cmdline).contains(marker) {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state letter follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

/// Starts `program args` detached (own process group, stdin closed, output appended to `log`)
/// and returns its pid. A thread reaps it if it exits while the launcher still runs and notes
/// its exit status in `log`.
pub fn spawn_detached(
    program: &Path,
    args: &[String],
    log: &Path,
    env: &[(&str, String)],
) -> std::io::Result<u32> {
    use std::os::unix::process::CommandExt;
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let (log, name) = (log.to_owned(), program.display().to_string());
    std::thread::spawn(move || {
        // A process that ends while the launcher runs leaves its exit status in its log, so a
        // boot failure shows how it ended even when it printed nothing.
        if let Ok(status) = child.wait() {
            if let Ok(mut f) = OpenOptions::new().append(true).open(&log) {
                use std::io::Write as _;
                let _ = writeln!(f, "[launcher] {name} (pid {pid}) exited: {status}");
            }
        }
    });
    Ok(pid)
}

/// Sends `signal` to `pid` if it still is the process identified by `marker`, then waits (up to
/// `grace`) for it to go; escalates to SIGKILL.
pub fn stop(pid: u32, marker: &str, signal: Signal, grace: Duration) {
    if !running(pid, marker) {
        return;
    }
    let Ok(raw) = i32::try_from(pid) else { return };
    let _ = kill(Pid::from_raw(raw), signal);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !running(pid, marker) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(pid, marker) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The last `n` lines of a log file, for error messages about a node that died at start.
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Why a process ended, from its log: the last `n` lines from where its fatal error begins
/// (`Error: ...` from an error returned by `main`, or a panic), so a stack trace after it does
/// not push the reason out of view; the plain tail when there is none.
pub fn log_failure(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let fatal = lines.iter().rposition(|l| {
        l.starts_with("Error: ") || l.starts_with("Error:") || l.contains("panicked at")
    });
    match fatal {
        Some(start) => lines[start..lines.len().min(start + n)].join("\n"),
        None => lines[lines.len().saturating_sub(n)..].join("\n"),
    }
}

/// True if one of the command-line arguments `args` (NUL-separated) is `dir` or names a path
/// inside it (also as the value of an `x=<path>` option, as swtpm takes them).
fn mentions_dir(args: &[u8], dir: &str) -> bool {
    let inside = format!("{dir}/");
    args.split(|b| *b == 0).any(|arg| {
        let arg = String::from_utf8_lossy(arg);
        arg == dir || arg.contains(&inside) || arg.ends_with(&format!("={dir}"))
    })
}

/// Pids of running processes (other than this one) whose command line names `dir` or a path in it.
pub fn pids_under(dir: &Path) -> Vec<u32> {
    let dir = dir.display().to_string();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| mentions_dir(&c, &dir))
                && running(pid, "")
        })
        .collect()
}

/// Stops (SIGTERM, then SIGKILL after `grace`) every process whose command line names `dir` or
/// a path in it: node processes a killed launcher started but did not get to record.
pub fn stop_all_under(dir: &Path, grace: Duration) {
    let pids = pids_under(dir);
    if pids.is_empty() {
        return;
    }
    tracing::warn!(dir = %dir.display(), ?pids, "stopping unrecorded node processes");
    for &pid in &pids {
        if let Ok(raw) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pids.iter().any(|&p| running(p, "")) {
        std::thread::sleep(Duration::from_millis(10));
    }
    for &pid in &pids {
        if running(pid, "") {
            if let Ok(raw) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_folder_is_matched_exactly() {
        let dir = "/c/nodes/acc-worker-1";
        let args = |a: &[&str]| a.join("\0").into_bytes();
        assert!(mentions_dir(&args(&["boot", "--node-dir", dir]), dir));
        assert!(mentions_dir(
            &args(&["swtpm", "--tpmstate", "dir=/c/nodes/acc-worker-1/tpm"]),
            dir
        ));
        assert!(!mentions_dir(
            &args(&["boot", "--node-dir", "/c/nodes/acc-worker-10"]),
            dir
        ));
        assert!(!mentions_dir(
            &args(&["swtpm", "dir=/c/nodes/acc-worker-10/tpm"]),
            dir
        ));
    }
}

#[cfg(test)]
mod log_tests {
    use super::*;

    #[test]
    fn a_failure_excerpt_starts_at_the_error_not_in_the_backtrace() {
        let log = std::env::temp_dir().join(format!(
            "constellation-log-failure-{}-{:x}.log",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut text = String::from("starting\nError: socket path too long\n\nStack backtrace:\n");
        for i in 0..40 {
            text.push_str(&format!("  {i}: frame\n"));
        }
        std::fs::write(&log, &text).unwrap();
        let excerpt = log_failure(&log, 5);
        assert!(
            excerpt.starts_with("Error: socket path too long"),
            "{excerpt}"
        );
        assert_eq!(excerpt.lines().count(), 5);
        assert!(
            !log_tail(&log, 5).contains("Error:"),
            "the plain tail misses it"
        );
        std::fs::write(&log, "a\nb\nc\n").unwrap();
        assert_eq!(log_failure(&log, 2), "b\nc");
        let _ = std::fs::remove_file(&log);
    }
}
