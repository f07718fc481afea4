//! Writers for the Prometheus text exposition format, so that a service's own counters
//! join the server's on one `/metrics` page, with the same `plexus_` prefix and escaping.

/// Writes a metric family's `# HELP` and `# TYPE` lines (`name` without the `plexus_` prefix).
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP plexus_{name} {help}\n# TYPE plexus_{name} {kind}"
    );
}

/// Writes one sample line; label values are escaped as the format requires.
pub fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    use std::fmt::Write;
    out.push_str("plexus_");
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        label_pairs(out, labels);
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Writes `key="value"` pairs separated by commas (no braces), values escaped as the format
/// requires: for samples [`sample`] does not write (histogram buckets, fractional values).
pub fn label_pairs(out: &mut String, labels: &[(&str, &str)]) {
    for (index, (key, value)) in labels.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        out.push_str(key);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
}
