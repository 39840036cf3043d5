//! The exposition of a metrics registry, shared by every process that serves `/metrics`
//! (serve, settle, the mock provider): OpenMetrics for clients that ask for it (Prometheus
//! does), the Prometheus text format 0.0.4 (which `promtool check metrics` reads) for the
//! rest.

use prometheus_client::registry::Registry;

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format 0.0.4.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a client with this `Accept` header gets OpenMetrics: it names
/// `application/openmetrics-text` (Prometheus does). Anyone else gets the text format
/// 0.0.4.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.to_ascii_lowercase()
            .contains("application/openmetrics-text")
    })
}

/// Encodes `registry`: as OpenMetrics when `openmetrics`, else as the text format 0.0.4.
/// Returns the body and its content type.
pub fn render(registry: &Registry, openmetrics: bool) -> (String, &'static str) {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    if openmetrics {
        (out, OPENMETRICS)
    } else {
        (to_text_format(&out), TEXT_FORMAT)
    }
}

/// The text format 0.0.4 of an OpenMetrics exposition as prometheus-client writes it: a
/// counter family is named with its `_total` suffix (as its samples are), `# UNIT` and
/// `# EOF` are dropped, and types 0.0.4 lacks become `untyped`.
pub fn to_text_format(openmetrics: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, text)) = help.take() {
                let _ = writeln!(out, "# HELP {name} {text}");
            }
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "gauge" | "histogram" | "summary" => ("", kind),
                _ => ("", "untyped"),
            };
            if let Some((_, text)) = help.take() {
                let _ = writeln!(out, "# HELP {name}{suffix} {text}");
            }
            let _ = writeln!(out, "# TYPE {name}{suffix} {kind}");
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
