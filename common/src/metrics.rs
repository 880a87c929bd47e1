//! In-process metrics in the Prometheus text format: counters, gauges and
//! histograms with labels, in one registry per process, rendered by the
//! `/metrics` handlers. A few lines instead of a metrics framework: an
//! update takes one uncontended lock and touches no database; a render
//! walks what was recorded, so a scrape costs the same at any number of
//! sagas.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{LazyLock, Mutex};

/// Buckets (seconds) for latencies: a millisecond to half a minute.
pub const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets for sizes (rows in a batch, sagas in a claim).
pub const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug)]
enum Value {
    Number(f64),
    Histogram {
        bounds: &'static [f64],
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

#[derive(Debug)]
struct Family {
    kind: Kind,
    help: &'static str,
    series: BTreeMap<String, Value>,
}

static REGISTRY: LazyLock<Mutex<BTreeMap<String, Family>>> =
    LazyLock::new(|| Mutex::new(BTreeMap::new()));

thread_local! {
    /// The label text of the update in progress: built here, so an update
    /// of a series that exists allocates nothing.
    static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

fn with_series(
    name: &str,
    kind: Kind,
    labels: &[(&str, &str)],
    update: impl FnOnce(&mut Value),
    new: impl FnOnce() -> Value,
) {
    KEY.with_borrow_mut(|key| {
        key.clear();
        write_labels(key, labels);
        let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        if !registry.contains_key(name) {
            registry.insert(
                name.to_owned(),
                Family {
                    kind,
                    help: "",
                    series: BTreeMap::new(),
                },
            );
        }
        let Some(family) = registry.get_mut(name) else {
            return;
        };
        match family.series.get_mut(key.as_str()) {
            Some(value) => update(value),
            None => update(family.series.entry(key.clone()).or_insert_with(new)),
        }
    });
}

/// Appends `labels` as Prometheus label text (`a="x",b="y"`), escaping
/// backslashes, quotes and newlines in the values.
fn write_labels(text: &mut String, labels: &[(&str, &str)]) {
    for (i, (name, value)) in labels.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(name);
        text.push_str("=\"");
        if value.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
            for c in value.chars() {
                match c {
                    '\\' => text.push_str("\\\\"),
                    '"' => text.push_str("\\\""),
                    '\n' => text.push_str("\\n"),
                    c => text.push(c),
                }
            }
        } else {
            text.push_str(value);
        }
        text.push('"');
    }
}

fn label_text(labels: &[(&str, &str)]) -> String {
    let mut text = String::new();
    write_labels(&mut text, labels);
    text
}

/// Declares `name` with its type and help text, so that it is rendered
/// (at zero, without labels, for counters and gauges) before its first
/// update.
pub fn describe_counter(name: &'static str, help: &'static str) {
    describe(name, Kind::Counter, help);
}

/// Declares the gauge `name` (see [`describe_counter`]).
pub fn describe_gauge(name: &'static str, help: &'static str) {
    describe(name, Kind::Gauge, help);
}

/// Declares the histogram `name`; it is rendered after its first
/// observation.
pub fn describe_histogram(name: &'static str, help: &'static str) {
    describe(name, Kind::Histogram, help);
}

fn describe(name: &'static str, kind: Kind, help: &'static str) {
    let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let family = registry.entry(name.to_owned()).or_insert_with(|| Family {
        kind,
        help,
        series: BTreeMap::new(),
    });
    family.help = help;
}

/// Adds `by` to the counter `name{labels}`.
pub fn count(name: &str, labels: &[(&str, &str)], by: u64) {
    with_series(
        name,
        Kind::Counter,
        labels,
        |value| {
            if let Value::Number(n) = value {
                *n += by as f64;
            }
        },
        || Value::Number(0.0),
    );
}

/// Sets the gauge `name{labels}`.
pub fn set(name: &str, labels: &[(&str, &str)], to: f64) {
    with_series(
        name,
        Kind::Gauge,
        labels,
        |value| *value = Value::Number(to),
        || Value::Number(0.0),
    );
}

/// Adds `delta` (negative to subtract) to the gauge `name{labels}`.
pub fn add(name: &str, labels: &[(&str, &str)], delta: f64) {
    with_series(
        name,
        Kind::Gauge,
        labels,
        |value| {
            if let Value::Number(n) = value {
                *n += delta;
            }
        },
        || Value::Number(0.0),
    );
}

/// Records `value` in the histogram `name{labels}` with `bounds` (the
/// bounds of the series' first observation stay).
pub fn observe(name: &str, labels: &[(&str, &str)], value: f64, bounds: &'static [f64]) {
    with_series(
        name,
        Kind::Histogram,
        labels,
        |series| {
            if let Value::Histogram {
                bounds,
                counts,
                sum,
                count,
            } = series
            {
                if let Some(i) = bounds.iter().position(|b| value <= *b) {
                    counts[i] += 1;
                }
                *sum += value;
                *count += 1;
            }
        },
        || Value::Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        },
    );
}

/// The value of the counter or gauge `name{labels}` (labels in the order
/// they were recorded with), or of a histogram's count; 0 when unrecorded.
pub fn value(name: &str, labels: &[(&str, &str)]) -> f64 {
    let registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    match registry
        .get(name)
        .and_then(|family| family.series.get(&label_text(labels)))
    {
        Some(Value::Number(n)) => *n,
        Some(Value::Histogram { count, .. }) => *count as f64,
        None => 0.0,
    }
}

/// Everything recorded, in the Prometheus text format (version 0.0.4).
pub fn render() -> String {
    let registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let mut text = String::new();
    for (name, family) in registry.iter() {
        if family.series.is_empty() && family.kind == Kind::Histogram {
            continue;
        }
        if !family.help.is_empty() {
            let _ = writeln!(text, "# HELP {name} {}", family.help);
        }
        let _ = writeln!(text, "# TYPE {name} {}", family.kind.as_str());
        if family.series.is_empty() {
            let _ = writeln!(text, "{name} 0");
        }
        for (labels, value) in &family.series {
            match value {
                Value::Number(n) if labels.is_empty() => {
                    let _ = writeln!(text, "{name} {n}");
                }
                Value::Number(n) => {
                    let _ = writeln!(text, "{name}{{{labels}}} {n}");
                }
                Value::Histogram {
                    bounds,
                    counts,
                    sum,
                    count,
                } => {
                    let sep = if labels.is_empty() { "" } else { "," };
                    let mut cumulative = 0;
                    for (bound, n) in bounds.iter().zip(counts) {
                        cumulative += n;
                        let _ = writeln!(
                            text,
                            "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
                        );
                    }
                    let _ = writeln!(text, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
                    let braces = if labels.is_empty() {
                        String::new()
                    } else {
                        format!("{{{labels}}}")
                    };
                    let _ = writeln!(text, "{name}_sum{braces} {sum}");
                    let _ = writeln!(text, "{name}_count{braces} {count}");
                }
            }
        }
    }
    text
}

/// The gRPC name of a code, e.g. `UNAVAILABLE` (google.rpc.Code's).
pub fn code_name(code: tonic::Code) -> &'static str {
    proto::google::rpc::Code::try_from(code as i32)
        .map(|c| c.as_str_name())
        .unwrap_or("UNKNOWN")
}

/// The gRPC code name at the start of a failure detail
/// (`"FAILED_PRECONDITION: out of stock"` gives `FAILED_PRECONDITION`), or
/// `UNKNOWN`.
pub fn code_of(detail: &str) -> &str {
    let head = detail.split(':').next().unwrap_or("");
    if !head.is_empty() && head.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
        head
    } else {
        "UNKNOWN"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_buckets() {
        describe_counter("test_things_total", "Things.");
        count("test_things_total", &[("kind", "a\"b")], 2);
        count("test_things_total", &[("kind", "a\"b")], 1);
        set("test_level", &[], 7.0);
        observe("test_wait_seconds", &[("step", "s")], 0.003, SECONDS);
        observe("test_wait_seconds", &[("step", "s")], 100.0, SECONDS);
        let text = render();
        assert!(
            text.contains("# HELP test_things_total Things.\n# TYPE test_things_total counter\n")
        );
        assert!(
            text.contains("test_things_total{kind=\"a\\\"b\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("test_level 7\n"));
        assert!(text.contains("test_wait_seconds_bucket{step=\"s\",le=\"0.0025\"} 0\n"));
        assert!(text.contains("test_wait_seconds_bucket{step=\"s\",le=\"0.005\"} 1\n"));
        assert!(text.contains("test_wait_seconds_bucket{step=\"s\",le=\"30\"} 1\n"));
        assert!(text.contains("test_wait_seconds_bucket{step=\"s\",le=\"+Inf\"} 2\n"));
        assert!(text.contains("test_wait_seconds_count{step=\"s\"} 2\n"));
        assert_eq!(value("test_things_total", &[("kind", "a\"b")]), 3.0);
    }

    #[test]
    fn codes_come_from_the_detail() {
        assert_eq!(
            code_of("FAILED_PRECONDITION: out of stock"),
            "FAILED_PRECONDITION"
        );
        assert_eq!(code_of("timed out"), "UNKNOWN");
    }
}
