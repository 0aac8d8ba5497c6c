//! docs/PATTERNS.md names, for every pattern, the test that proves it. This keeps the
//! document honest: every test it cites must exist.
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name == ".git" {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The test names cited in the document: the last `::`-separated segment of each
/// backticked reference in the "proven by" column.
fn cited_tests(doc: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in doc.lines().filter(|l| l.starts_with('|')) {
        let Some(proven_by) = line.trim_end_matches('|').rsplit('|').next() else {
            continue;
        };
        for reference in proven_by.split('`').skip(1).step_by(2) {
            if let Some((_, name)) = reference.rsplit_once("::") {
                if name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                {
                    names.push(name.to_owned());
                }
            }
        }
    }
    names
}

#[test]
fn every_test_that_docs_patterns_cites_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/PATTERNS.md")).unwrap_or_default();
    let cited = cited_tests(&doc);
    assert!(
        cited.len() >= 30,
        "docs/PATTERNS.md cites only {} tests",
        cited.len()
    );
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let sources: String = files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .collect::<Vec<_>>()
        .join("\n");
    let missing: Vec<&String> = cited
        .iter()
        .filter(|name| !sources.contains(&format!("fn {name}(")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/PATTERNS.md cites tests that do not exist: {missing:?}"
    );
}
