//! The JSON verdict every `attest verify ...` prints: each check by name, and on failure the
//! failed check with expected and found values. Exit code 0 only when every check passed.

use std::process::ExitCode;

use serde::Serialize;

/// One named check.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Check {
    pub fn pass(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: true,
            expected: None,
            found: None,
            detail: None,
        }
    }

    pub fn fail(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: false,
            expected: None,
            found: None,
            detail: Some(detail.into()),
        }
    }

    pub fn values(mut self, expected: impl Into<String>, found: impl Into<String>) -> Self {
        self.expected = Some(expected.into());
        self.found = Some(found.into());
        self
    }
}

#[derive(Debug, Serialize)]
struct Verdict<'a> {
    verdict: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    failed_check: Option<&'a Check>,
    checks: &'a [Check],
    #[serde(skip_serializing_if = "Option::is_none")]
    extra: Option<serde_json::Value>,
}

/// Prints the verdict as JSON on stdout and returns the exit code (0 = every check passed).
pub fn report(checks: &[Check], extra: Option<serde_json::Value>) -> ExitCode {
    let failed = checks.iter().find(|c| !c.ok);
    let v = Verdict {
        verdict: if failed.is_none() && !checks.is_empty() {
            "accept"
        } else {
            "reject"
        },
        failed_check: failed,
        checks,
        extra,
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&v).expect("verdict serializes")
    );
    if v.verdict == "accept" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
