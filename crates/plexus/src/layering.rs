//! The runtime's module layering, checked: each module may use only modules of lower layers
//! (docs/ARCHITECTURE.md draws the same list). The check reads the sources and looks at every
//! `crate::module` path outside comments, so a new upward import fails here, not in review.

use std::collections::BTreeSet;
use std::path::Path;

/// Bottom to top. A module of layer `i` may use modules of layers below `i` only.
const LAYERS: &[&[&str]] = &[
    // Foundations: no runtime state of their own beyond what they name.
    &[
        "config",
        "outbound",
        "log_throttle",
        "idle_order",
        "upgrade",
        "datagram_admission",
        "session_id",
        "refusal",
        "loop_local",
        "prometheus",
    ],
    // Sans-IO stages and the TLS context.
    &["tls", "connection", "tls_client"],
    &["dtls"],
    // Counters and the worker pool.
    &["worker"],
    &["breakdown"],
    // Upstreams (below the counters that list them).
    &["connector"],
    &["metrics"],
    &["admission"],
    // The service API, and what is built on it alone.
    &["service"],
    // Per-listener service factories, framers, protocol groups.
    &["broadcast", "registry", "framing", "protocol_group"],
    // The per-connection state an event loop keeps.
    &["session", "loop_timer"],
    // The loops: the datagram part below the stream loop that drives it.
    &["datagram", "accept"],
    &["event_loop"],
    // The control plane.
    &["reload"],
    // Listener setup (binding, per-listener service and options), and the library's errors.
    &["error"],
    // The client runtime: event loops without listeners.
    &["client"],
    &["listen"],
    &["acceptor"],
    &["server"],
    // Drives one session of a service in memory (feature `testing`).
    &["testing"],
];

/// Same-layer imports not yet broken up (each pair imports the other): listed so that no new
/// one appears unnoticed. None are left: `loop_timer` took the timer entries `datagram`
/// and `event_loop` both need.
const KNOWN_CYCLES: &[(&str, &str)] = &[];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The module a source file belongs to: `src/x.rs` and `src/x/…` are `x`.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("file under src");
    let first = relative.components().next().expect("non-empty path");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::name` in `source` outside `//` comments, `name` starting lower-case.
fn crate_paths(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

#[test]
fn modules_only_use_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut problems = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == "lib" || module == "layering" {
            continue;
        }
        let Some(layer) = layer_of(&module) else {
            problems.push(format!("{module}: not in any layer of LAYERS"));
            continue;
        };
        let source = std::fs::read_to_string(file).expect("read source");
        for used in crate_paths(&source) {
            if used == module {
                continue;
            }
            let Some(used_layer) = layer_of(&used) else {
                problems.push(format!(
                    "{}: uses {used}, which is in no layer",
                    file.display()
                ));
                continue;
            };
            let known = KNOWN_CYCLES.contains(&(module.as_str(), used.as_str()));
            if used_layer > layer || (used_layer == layer && !known) {
                problems.push(format!(
                    "{}: {module} (layer {layer}) uses {used} (layer {used_layer})",
                    file.display()
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checker_sees_imports_and_skips_comments() {
    let found = crate_paths("use crate::service::{Session};\n// crate::server\nlet x = crate::Error; crate::event_loop::X");
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        vec!["event_loop".to_owned(), "service".to_owned()]
    );
}
