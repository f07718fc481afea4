//! `plexus bench --hdr-out FILE` against a real `plexus serve`: the file is HdrHistogram's
//! percentile-distribution text format and holds every operation of the run.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn hdr_out_writes_the_percentile_distribution_of_every_measured_message() {
    let server = Server::start(&echo_config(""));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tcp-echo.hgrm");
    let addr = server.addr("tcp-echo").to_string();
    let out = run_plexus(
        &[
            "bench",
            "tcp-echo",
            "--addr",
            &addr,
            "--connections",
            "4",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--hdr-out",
            file.to_str().unwrap(),
        ],
        None,
        Duration::from_secs(60),
    );
    out.assert_no_panic();
    out.assert_code(0);
    let json: serde_json::Value =
        serde_json::from_slice(out.stdout.trim_ascii()).expect("one JSON line");
    let messages = json["messages"].as_u64().expect("a message count");
    assert!(messages > 0);
    assert_eq!(json["errors_total"], 0);

    let text = std::fs::read_to_string(&file).expect("--hdr-out wrote the file");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"],
        "{text}"
    );
    assert_eq!(lines.next(), Some(""), "a blank line after the header");
    let rows: Vec<Vec<&str>> = lines
        .clone()
        .take_while(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(rows.len() >= 2, "{text}");
    for row in &rows[..rows.len() - 1] {
        assert_eq!(row.len(), 4, "{row:?}");
        let _: f64 = row[0].parse().unwrap();
        let percentile: f64 = row[1].parse().unwrap();
        assert!((0.0..1.0).contains(&percentile), "{row:?}");
    }
    let last = rows.last().unwrap();
    assert_eq!(last[1], "1.000000000000", "{text}");
    assert_eq!(last[2].parse::<u64>().unwrap(), messages, "{text}");
    let footer: Vec<&str> = lines.filter(|l| l.starts_with("#[")).collect();
    assert_eq!(footer.len(), 3, "{text}");
    assert!(footer[0].starts_with("#[Mean    = ") && footer[0].contains("StdDeviation   = "));
    let total: u64 = footer[1]
        .split("Total count    =")
        .nth(1)
        .and_then(|rest| rest.trim().trim_end_matches(']').trim().parse().ok())
        .unwrap_or_else(|| panic!("no total count in {:?}", footer[1]));
    assert_eq!(total, messages);
    assert!(footer[2].starts_with("#[Buckets = "), "{text}");
    // The JSON's percentiles come from the same histogram (µs in both).
    let max: f64 = footer[1]
        .trim_start_matches("#[Max     =")
        .split(',')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let json_max = json["latency_us"]["max"].as_f64().unwrap();
    assert!(
        (max - json_max).abs() < 0.01 + json_max * 1e-6,
        "{max} vs {json_max}"
    );
}
