//! Logging to stderr in go-plugin's hclog JSON form: Terraform parses each line and logs it
//! at the level given, so `TF_LOG=INFO` (or `TF_LOG_PROVIDER=INFO`) shows provider progress.

use std::fmt::Write as _;
use std::io::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

struct HclogLayer;

#[derive(Default)]
struct Fields {
    message: String,
    extra: serde_json::Map<String, serde_json::Value>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.extra.insert(field.name().to_owned(), value.into());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.record_str(field, &s);
    }
}

fn level_name(l: &Level) -> &'static str {
    match *l {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// hclog's timestamp form, microseconds exactly: go-plugin parses `@timestamp` with the layout
/// `2006-01-02T15:04:05.000000Z07:00` and logs a line it cannot parse raw at DEBUG, so a
/// nanosecond RFC 3339 time would hide every INFO line from `TF_LOG=INFO`.
fn timestamp(t: time::OffsetDateTime) -> String {
    const FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(FORMAT)
        .unwrap_or_default()
}

/// One hclog JSON line for an event.
fn line(level: &Level, target: &str, fields: Fields) -> String {
    let mut obj = fields.extra;
    obj.insert("@level".into(), level_name(level).into());
    obj.insert("@message".into(), fields.message.into());
    obj.insert("@module".into(), format!("constellation.{target}").into());
    let now = timestamp(time::OffsetDateTime::now_utc());
    obj.insert("@timestamp".into(), now.into());
    serde_json::Value::Object(obj).to_string()
}

impl<S: Subscriber> Layer<S> for HclogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let l = line(meta.level(), meta.target(), fields);
        let _ = writeln!(std::io::stderr().lock(), "{l}");
    }
}

/// Installs the stderr logger; level from `CONSTELLATION_PROVIDER_LOG` (default `info`).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONSTELLATION_PROVIDER_LOG")
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,h2=warn,tonic=warn,hyper=warn")
        });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(HclogLayer)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_hclog_json() {
        let mut f = Fields {
            message: "node attested".into(),
            ..Default::default()
        };
        f.extra.insert("cluster".into(), "demo".into());
        let l = line(&Level::INFO, "x", f);
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["@level"], "info");
        assert_eq!(v["@message"], "node attested");
        assert_eq!(v["cluster"], "demo");
        // Exactly six fractional digits, as go-plugin's parser demands.
        let ts = v["@timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), "2026-12-04T18:32:18.921707Z".len(), "{ts}");
        let t = time::macros::datetime!(2026-12-04 18:32:18.921707131 UTC);
        assert_eq!(timestamp(t), "2026-12-04T18:32:18.921707Z");
    }
}
