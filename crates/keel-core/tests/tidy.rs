//! House rules a compiler does not check, checked over the workspace's sources.
//!
//! Every `match` on an `ErrorClass` or a `Disposition` is exhaustive: a class added to
//! the taxonomy must be decided everywhere, not fall silently into a `_ =>` arm. A
//! decision about one or two classes is an `if`, which says what it is.

#![allow(missing_docs)]

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if !path.ends_with("target") && !path.ends_with("node_modules") {
                sources(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Whether an arm of a match (trimmed) names an `ErrorClass` or `Disposition` variant.
fn names_a_class(arm: &str) -> bool {
    let arm = arm.trim_start_matches('|').trim_start();
    ["ErrorClass::", "Disposition::", "C::"]
        .iter()
        .any(|p| arm.strip_prefix(p).is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase())))
}

/// The lines (1-based) of `_ =>` arms of matches whose other arms name classes.
fn wildcard_class_matches(text: &str) -> Vec<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !line.trim_start().starts_with("_ =>") {
            continue;
        }
        let level = indent(line);
        let mut siblings = lines[..i]
            .iter()
            .rev()
            .filter(|l| !l.trim().is_empty())
            .take_while(|l| indent(l) >= level)
            .filter(|l| indent(l) == level);
        if siblings.any(|l| names_a_class(l.trim())) {
            found.push(i + 1);
        }
    }
    found
}

#[test]
fn the_checker_finds_a_wildcard_among_class_arms() {
    let bad = "match c {\n    ErrorClass::Timeout => 1,\n    _ => 2,\n}\n";
    assert_eq!(wildcard_class_matches(bad), [3]);
    let fine = "match x {\n    Some(_) => 1,\n    _ => 2,\n}\n";
    assert!(wildcard_class_matches(fine).is_empty());
}

#[test]
fn every_match_on_a_class_or_disposition_is_exhaustive() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    sources(&root.join("crates"), &mut files);
    sources(&root.join("examples"), &mut files);
    assert!(files.len() > 50, "the sources were found: {}", files.len());
    let mut bad = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for line in wildcard_class_matches(&text) {
            bad.push(format!("{}:{line}", file.display()));
        }
    }
    assert!(
        bad.is_empty(),
        "a `_ =>` arm among ErrorClass/Disposition arms (list every class, or use `if`):\n{}",
        bad.join("\n")
    );
}
