//! Reading Markdown tables for the tests that check documentation against
//! the programs.

use std::collections::BTreeSet;

/// The backquoted words of the first cell of each row of the tables under
/// `heading` in `text`, up to the next heading.
pub fn table_keys(text: &str, heading: &str) -> BTreeSet<String> {
    let mut lines = text.lines().skip_while(|l| l.trim() != heading);
    assert!(lines.next().is_some(), "no {heading:?} section");
    lines
        .take_while(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with("| `"))
        .flat_map(|row| {
            let first = row.split(" | ").next().unwrap_or_default();
            first
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}
